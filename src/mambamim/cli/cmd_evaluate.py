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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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
    from mambamim.data.errors import DataError
    from mambamim import inference
    from mambamim.engine import inference as loaders
    from mambamim.evaluation.report import cache_nsd_tolerance, evaluate_on_cache, labeled_cases, write_evaluation

    if not os.path.exists(args.data):
        return error("evaluate", f"data not found: {args.data}")
    if args.nsd_tolerance is not None and args.nsd_tolerance < 0:
        return error("evaluate", f"--nsd-tolerance must be >= 0, got {args.nsd_tolerance}")
    try:
        roi = roi_arg(args.roi)
        run_split = None
        if args.split is not None and args.split.lower() in RUN_SPLITS:
            # before loading the model: a checkpoint outside a run is refused at once
            run_split = split_of_run(args.checkpoint, args.split)
        model, info = loaders.load_segmenter(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return error("evaluate", str(exc))
    if args.compile:
        model = inference.compile_segmenter(model)
    try:
        cache = _resolve_cache(args, info)
        if run_split is not None:
            ids = _split_cases(cache, run_split, args.cases)
        else:
            ids = labeled_cases(cache, split=args.split, case_ids=args.cases)
        tolerance = args.nsd_tolerance if args.nsd_tolerance is not None else cache_nsd_tolerance(cache)
    except (DataError, ValueError, OSError) as exc:
        return error("evaluate", str(exc))
    if not ids:
        return error("evaluate", f"no labeled case to evaluate in {cache}"
                     + (f" (split {args.split!r})" if args.split else ""))
    tol_note = "given" if args.nsd_tolerance is not None else "the cache's mean voxel size"
    print(_banner(args, info, cache, ids, run_split, roi, tolerance, tol_note), file=sys.stderr)
    t0 = time.perf_counter()
    on_case = _prediction_writer(os.path.join(args.out, "predictions")) if args.save_predictions else None
    try:
        table = evaluate_on_cache(model, info, cache, ids, roi=roi, overlap=args.overlap,
                                  sw_batch_size=args.sw_batch_size, tta_flips=args.tta, amp=args.amp,
                                  nsd_tolerance_mm=tolerance, progress=args.progress, on_case=on_case)
    except (DataError, ValueError) as exc:
        return error("evaluate", str(exc))
    seconds = time.perf_counter() - t0
    extra = {"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(str(cache)),
             "split": args.split, "split_source": run_split["source"] if run_split else None,
             "nsd_tolerance_mm": tolerance, "nsd_tolerance_from": tol_note, "overlap": args.overlap, "tta": args.tta,
             "seconds": round(seconds, 2)}
    paths = write_evaluation(table, args.out, title=f"Evaluation of {os.path.basename(args.checkpoint)}", extra=extra)
    print(table.summary_markdown())
    print(f"{len(table.rows)} case(s) in {seconds:.1f} s; wrote {paths['per_case']}, {paths['summary_json']}, "
          f"{paths['summary_md']}")
    return 0


RUN_SPLITS = {"train": "train", "training": "train", "val": "validation", "validation": "validation"}
"""``--split`` names that select a fine-tuning run's cases, and their key in ``RUN/split.json``."""


def run_folder(checkpoint: str | os.PathLike) -> Path:
    """The fine-tuning run folder of a checkpoint: the folder itself, RUN for RUN/checkpoints/x.pt,
    else the checkpoint's folder."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    parent = path.parent
    return parent.parent if parent.name == "checkpoints" else parent


def split_of_run(checkpoint: str | os.PathLike, split: str) -> dict:
    """The case ids of one split (``train`` / ``val``) of the run a checkpoint belongs to.

    Reads ``RUN/split.json`` (written by ``mambamim finetune``), else the ``split`` the checkpoint
    records.

    Returns:
        ``{"name": "train" | "validation", "ids": [case id, ...], "source": path read}``.

    Raises:
        ValueError: no such split name, or no split found (the checkpoint is not inside a
            fine-tuning run folder and records none), or the split holds no case.
    """
    key = RUN_SPLITS.get(split.lower())
    if key is None:
        raise ValueError(f"--split {split!r} is not a split of a fine-tuning run (train or val)")
    run = run_folder(checkpoint)
    split_path = run / "split.json"
    found, source = None, None
    if split_path.is_file():
        try:
            found = json.loads(split_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{split_path}: cannot read the run's split ({exc})") from None
        source = str(split_path)
    else:
        found = _checkpoint_split(checkpoint)
        source = f"the split recorded in {checkpoint}"
    if not isinstance(found, dict) or not isinstance(found.get(key), list):
        raise ValueError(
            f"--split {split}: {checkpoint} is not inside a fine-tuning run folder with a split "
            f"(no {split_path}, and the checkpoint records none); give the run's checkpoints/best.pt, "
            f"or choose cases with --cases")
    ids = [str(c) for c in found[key]]
    if not ids:
        raise ValueError(f"--split {split}: the run {run} has no {key} cases ({source}"
                         + (f"; {found['how']}" if found.get("how") else "") + ")")
    return {"name": key, "ids": ids, "source": source}


def _checkpoint_split(checkpoint: str | os.PathLike) -> dict | None:
    """The ``split`` a fine-tuning checkpoint records (None if unreadable or absent)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = next((p for p in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt")
                     if p.is_file()), path / "checkpoints" / "best.pt")
    if not path.is_file():
        return None
    try:
        from mambamim.engine.checkpoint import load_checkpoint

        state = load_checkpoint(path, map_location="cpu")
    except Exception:  # a damaged file: the model load names the problem
        return None
    split = state.get("split") if isinstance(state, dict) else None
    return split if isinstance(split, dict) else None


def _split_cases(cache: str, run_split: dict, cases: list[str] | None) -> list[str]:
    """The run split's case ids that are labeled cases of ``cache`` (all of them, or it fails), in the
    cache's order, optionally only those in ``cases``."""
    from mambamim.evaluation.report import labeled_cases

    labeled = labeled_cases(cache)
    missing = [c for c in run_split["ids"] if c not in set(labeled)]
    if missing:
        raise ValueError(
            f"{len(missing)} of the run's {len(run_split['ids'])} {run_split['name']} case(s) are not labeled cases "
            f"of {cache}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (from {run_split['source']}; "
            "is --data the data the run was trained on?)")
    wanted = set(run_split["ids"])
    if cases is not None:
        outside = sorted(set(cases) - wanted)
        if outside:
            raise ValueError(f"--cases {', '.join(outside[:10])}: not {run_split['name']} cases of the run")
        wanted &= set(cases)
    return [c for c in labeled if c in wanted]


def _banner(args: argparse.Namespace, info: dict, cache: str, ids: list[str], run_split: dict | None,
            roi, tolerance: float, tol_note: str) -> str:
    """The start-of-run line: what is evaluated, where, and how, in words."""
    from mambamim.engine.banner import precision_words, processes_words, tta_words, window_words
    from mambamim.inference import inference_amp, resolve_device, roi_from_info

    device = resolve_device(args.device)
    which = (f"the run's {run_split['name']} cases ({run_split['source']})" if run_split
             else f"split {args.split!r}" if args.split else "every labeled case")
    return (f"evaluating {args.checkpoint} on {len(ids)} case(s) of {cache}, {which}: "
            f"{processes_words(1, device)}, {precision_words(inference_amp(device, args.amp))}, "
            f"{window_words(tuple(roi) if roi else roi_from_info(info), args.overlap)}, {tta_words(args.tta)}, "
            f"surface-Dice tolerance {tolerance:g} mm ({tol_note})")


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
    # the FAILED lines below are the listing: prepare logs them at debug level only
    report = prepare_dataset(args.data, out, params, workers=max(1, args.workers), progress=args.progress,
                             log_problems=False)
    for f in report.failed:
        print(f"FAILED {f.get('file')}: {f.get('problem')}", file=sys.stderr)
    return out
