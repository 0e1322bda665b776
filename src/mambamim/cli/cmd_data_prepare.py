"""``mambamim data prepare``: check and preprocess a dataset into the training cache."""

from __future__ import annotations

import argparse
import sys

from mambamim.data.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="NIfTI file or folder, DICOM series folder(s), nnU-Net raw folder, or Decathlon dataset.json")
    parser.add_argument("--out", required=True, help="cache folder to write (reruns skip finished cases)")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.5], metavar="MM",
                        help="target voxel size in mm: one value (isotropic) or X Y Z (default 1.5)")
    parser.add_argument("--hu-min", type=float, default=-175.0, help="lower intensity bound, maps to 0 (default -175)")
    parser.add_argument("--hu-max", type=float, default=250.0, help="upper intensity bound, maps to 1 (default 250)")
    parser.add_argument("--no-crop-foreground", action="store_true", help="keep the whole field of view")
    parser.add_argument("--crop-margin", type=int, default=4, help="voxels kept around the body (default 4)")
    parser.add_argument("--min-size", type=int, nargs="+", default=[96], metavar="N",
                        help="pad each axis to at least this size: one value or X Y Z (default 96)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--keep-constant", action="store_true",
                        help="keep images whose voxels are all equal (left out by default: nothing to learn from)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any input has a problem")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from mambamim.data.prepare import prepare_dataset
    from mambamim.data.preprocess import PreprocessParams

    if len(args.spacing) not in (1, 3):
        print("error: --spacing takes one value or three (X Y Z)", file=sys.stderr)
        return 2
    if len(args.min_size) not in (1, 3):
        print("error: --min-size takes one value or three (X Y Z)", file=sys.stderr)
        return 2
    try:
        params = PreprocessParams(spacing=args.spacing, hu_min=args.hu_min, hu_max=args.hu_max,
                                  crop_foreground=not args.no_crop_foreground, min_size=args.min_size,
                                  crop_margin=args.crop_margin)
        if args.workers < 1:
            raise ValueError("--workers must be >= 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = prepare_dataset(args.input, args.out, params=params, workers=args.workers, strict=args.strict,
                                 progress=not args.no_progress, keep_constant=args.keep_constant,
                                 log_problems=False)
    except DataError as exc:
        print(f"mambamim data prepare: {exc}", file=sys.stderr)
        return 1
    for bad in report.failed:
        print(f"FAILED {bad['case']}: {bad['file']}: {bad['problem']}", file=sys.stderr)
    for left in report.excluded:
        print(f"LEFT OUT {left['case']}: {left['file']}: {left['problem']}", file=sys.stderr)
    for w in report.warnings:
        who = f" {w['case']}" if w.get("case") else ""
        print(f"warning{who}: {w['file']}: {w['problem']}", file=sys.stderr)
    print(report.summary())
    if report.failed:
        print(f"problems listed in {report.out}/report.json", file=sys.stderr)
    code = report.exit_code(strict=args.strict)
    if code and report.n_ready == 0:
        print("error: no case could be prepared", file=sys.stderr)
    elif code:
        print("error: --strict and some inputs failed", file=sys.stderr)
    return code
