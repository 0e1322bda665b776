"""``mambamim evaluate``: per-case and per-class Dice / HD95 / surface Dice of a checkpoint.

``--data`` is a prepared cache, or labeled raw data (NIfTI / DICOM / nnU-Net / Decathlon) that is
prepared on the fly into ``OUT/cache`` with the checkpoint's preprocessing. Writes
``OUT/per_case.csv`` (one row per case), ``OUT/summary.json`` and ``OUT/summary.md``, and prints
the summary table; with ``--save-predictions`` also ``OUT/predictions/<case>_seg.nii.gz`` in each
case's original geometry. Scores are computed in cache space (see :mod:`mambamim.evaluation.report`).

``--split train`` / ``--split val`` evaluate exactly the training / validation cases of the
fine-tuning run the checkpoint belongs to (``RUN/split.json``, else the split the checkpoint
records); another split name selects the cache's cases marked with it (e.g. ``test``). The
surface-Dice tolerance defaults to the cache's mean voxel size (``--nsd-tolerance`` overrides).

The command parses its arguments, calls :func:`mambamim.api.evaluate_run` and prints its result.
"""

from __future__ import annotations

import argparse
import os
import sys

from mambamim.cli.cmd_predict import add_compile_argument, add_device_arguments, add_window_arguments, error, roi_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fine-tuning checkpoint (best.pt / last.pt) or run folder")
    parser.add_argument("--data", required=True, help="a prepared cache, or labeled raw data to prepare into OUT/cache")
    parser.add_argument("--out", required=True, help="output folder (per_case.csv, summary.json, summary.md)")
    parser.add_argument("--split", default=None,
                        help="train or val: exactly the fine-tuning run's training or validation cases "
                             "(RUN/split.json of the checkpoint's run); another name (e.g. test): the cache's "
                             "cases marked with that split")
    parser.add_argument("--cases", nargs="+", default=None, help="only these case ids (with --split: of that split)")
    parser.add_argument("--save-predictions", action="store_true",
                        help="also write each prediction as OUT/predictions/<case>_seg.nii.gz in its original geometry")
    parser.add_argument("--nsd-tolerance", type=float, default=None, metavar="MM",
                        help="surface-Dice tolerance in mm (default: the cache's mean voxel size, "
                             "e.g. 6 for 6 mm voxels)")
    add_window_arguments(parser)
    add_device_arguments(parser)
    add_compile_argument(parser)
    parser.add_argument("--workers", type=int, default=1, help="processes for on-the-fly preparation (default 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from mambamim.api import evaluate_run

    if args.nsd_tolerance is not None and args.nsd_tolerance < 0 and os.path.exists(args.data):
        return error("evaluate", f"--nsd-tolerance must be >= 0, got {args.nsd_tolerance}")
    try:
        result = evaluate_run(
            args.checkpoint, args.data, args.out, split=args.split, cases=args.cases,
            save_predictions=args.save_predictions, nsd_tolerance_mm=args.nsd_tolerance, device=args.device,
            compile=args.compile, workers=args.workers, progress=args.progress, log_problems=False,
            on_start=print_start, roi=roi_arg(args.roi), overlap=args.overlap, sw_batch_size=args.sw_batch_size,
            tta_flips=args.tta, amp=args.amp)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        return error("evaluate", str(exc))
    print_result(result)
    return 0


def print_start(plan) -> None:
    """Print the cache warning, the cases preparation could not prepare and the start-of-run line
    (what is evaluated, where, and how, in words) on stderr."""
    from mambamim.engine.banner import precision_words, processes_words, tta_words, window_words
    from mambamim.inference import inference_amp

    if plan.cache_warning:
        print(f"warning: {plan.cache_warning}", file=sys.stderr)
    for f in plan.prepare_failed:
        print(f"FAILED {f.get('file')}: {f.get('problem')}", file=sys.stderr)
    run_split = plan.run_split
    which = (f"the run's {run_split['name']} cases ({run_split['source']})" if run_split
             else f"split {plan.split!r}" if plan.split else "every labeled case")
    print(f"evaluating {plan.checkpoint} on {len(plan.case_ids)} case(s) of {plan.cache}, {which}: "
          f"{processes_words(1, plan.device)}, {precision_words(inference_amp(plan.device, plan.amp))}, "
          f"{window_words(plan.roi, plan.overlap)}, {tta_words(plan.tta)}, "
          f"surface-Dice tolerance {plan.nsd_tolerance_mm:g} mm ({plan.nsd_tolerance_from})", file=sys.stderr)


def print_result(result) -> None:
    """Print an evaluation's summary table and the files written."""
    paths = result.paths
    print(result.table.summary_markdown())
    print(f"{len(result.table.rows)} case(s) in {result.seconds:.1f} s; wrote {paths['per_case']}, "
          f"{paths['summary_json']}, {paths['summary_md']}")
