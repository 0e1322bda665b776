"""``mambamim evaluate``: per-case and per-class Dice / HD95 / surface Dice of a checkpoint.

``--data`` is a prepared cache, or labeled raw data (NIfTI / DICOM / nnU-Net / Decathlon) that is
prepared on the fly into ``OUT/cache`` with the checkpoint's preprocessing. Writes
``OUT/per_case.csv`` (one row per case), ``OUT/summary.json`` and ``OUT/summary.md``, and prints
the summary table; with ``--save-predictions`` also ``OUT/predictions/<case>_seg.nii.gz`` in each
case's original geometry. Scores are computed in cache space (see :mod:`mambamim.evaluation.report`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mambamim.cli.cmd_predict import add_compile_argument, add_device_arguments, add_window_arguments, error, roi_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fine-tuning checkpoint (best.pt / last.pt) or run folder")
    parser.add_argument("--data", required=True, help="a prepared cache, or labeled raw data to prepare into OUT/cache")
    parser.add_argument("--out", required=True, help="output folder (per_case.csv, summary.json, summary.md)")
    parser.add_argument("--split", default=None, help="only cases of this split of the cache (e.g. val, test)")
    parser.add_argument("--cases", nargs="+", default=None, help="only these case ids")
    parser.add_argument("--save-predictions", action="store_true",
                        help="also write each prediction as OUT/predictions/<case>_seg.nii.gz in its original geometry")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="surface-Dice tolerance in mm (default 1.0)")
    add_window_arguments(parser)
    add_device_arguments(parser)
    add_compile_argument(parser)
    parser.add_argument("--workers", type=int, default=1, help="processes for on-the-fly preparation (default 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from mambamim.data.errors import DataError
    from mambamim.engine import inference
    from mambamim.evaluation.report import evaluate_on_cache, labeled_cases, write_evaluation

    if not os.path.exists(args.data):
        return error("evaluate", f"data not found: {args.data}")
    try:
        roi = roi_arg(args.roi)
        model, info = inference.load_segmenter(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return error("evaluate", str(exc))
    if args.compile:
        model = inference.compile_segmenter(model)
    try:
        cache = _resolve_cache(args, info)
        ids = labeled_cases(cache, split=args.split, case_ids=args.cases)
    except (DataError, ValueError, OSError) as exc:
        return error("evaluate", str(exc))
    if not ids:
        return error("evaluate", f"no labeled case to evaluate in {cache}"
                     + (f" (split {args.split!r})" if args.split else ""))
    t0 = time.perf_counter()
    on_case = _prediction_writer(os.path.join(args.out, "predictions")) if args.save_predictions else None
    try:
        table = evaluate_on_cache(model, info, cache, ids, roi=roi, overlap=args.overlap,
                                  sw_batch_size=args.sw_batch_size, tta_flips=args.tta, amp=args.amp,
                                  nsd_tolerance_mm=args.nsd_tolerance, progress=args.progress, on_case=on_case)
    except (DataError, ValueError) as exc:
        return error("evaluate", str(exc))
    seconds = time.perf_counter() - t0
    extra = {"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(str(cache)),
             "nsd_tolerance_mm": args.nsd_tolerance, "overlap": args.overlap, "tta": args.tta,
             "seconds": round(seconds, 2)}
    paths = write_evaluation(table, args.out, title=f"Evaluation of {os.path.basename(args.checkpoint)}", extra=extra)
    print(table.summary_markdown())
    print(f"{len(table.rows)} case(s) in {seconds:.1f} s; wrote {paths['per_case']}, {paths['summary_json']}, "
          f"{paths['summary_md']}")
    return 0


def _prediction_writer(folder: str):
    """on_case callback writing a prediction in its case's original voxel grid and affine."""
    import numpy as np

    from mambamim.data.preprocess import restore_to_original, save_nifti_atomic

    def write(case_id: str, pred, case: dict) -> None:
        dtype = np.uint8 if int(pred.max(initial=0)) <= 255 else np.uint16
        restored, affine = restore_to_original(pred.astype(dtype), case["meta"], is_label=True)
        save_nifti_atomic(restored.astype(dtype, copy=False), affine, os.path.join(folder, f"{case_id}_seg.nii.gz"))

    return write


def _resolve_cache(args: argparse.Namespace, info: dict) -> str:
    from mambamim.data.cache import load_cache_index
    from mambamim.data.preprocess import PreprocessParams
    from mambamim.engine.config import find_cache

    params = PreprocessParams.from_dict(info.get("preprocessing"))
    cache = find_cache(args.data)
    if cache is not None:
        index = load_cache_index(cache)
        if index.get("preprocessing") and PreprocessParams.from_dict(index["preprocessing"]) != params:
            print(f"warning: cache {cache} was prepared with other preprocessing than the checkpoint's "
                  f"({index['preprocessing']} vs {params.to_dict()})", file=sys.stderr)
        return str(cache)
    from mambamim.data.prepare import prepare_dataset

    out = os.path.join(args.out, "cache")
    report = prepare_dataset(args.data, out, params, workers=max(1, args.workers), progress=args.progress)
    for f in report.failed:
        print(f"FAILED {f.get('file')}: {f.get('problem')}", file=sys.stderr)
    return out
