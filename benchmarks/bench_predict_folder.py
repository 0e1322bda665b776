"""Segmenting a folder of real-size CTs: the stages one after another vs reading the next cases (one or two
ahead) and writing the last one in threads while the network runs (``predict_files(..., overlap_io=...,
read_ahead=...)``), in the same run.

    python benchmarks/bench_predict_folder.py [--cases 4] [--size base] [--device cuda] [--spacing 1.5] [--compile]

The CTs are bench_preprocess.py's synthetic 512x512x200 scans; the network is an untrained HyMamba of
``--size`` (its weights do not change the time); ``--compile`` runs it as `mambamim predict --compile` does
(:func:`mambamim.inference.compile_segmenter`). Prints seconds per case for each mode, twice.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from bench_preprocess import synthetic_ct
from mambamim.inference.batch import predict_files
from mambamim.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--spacing", type=float, default=1.5, help="the checkpoint's preprocessing spacing (mm)")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--compile", action="store_true", help="the CLI's --compile: torch.compile, channels-last")
    args = parser.parse_args()
    root = tempfile.mkdtemp()
    folder = os.path.join(root, "in")
    os.makedirs(folder)
    for i in range(args.cases):
        synthetic_ct((512, 512, 200), [0.78, 0.78, 2.0], os.path.join(folder, f"ct{i}.nii.gz"))
    device = torch.device(args.device)
    model = create_model("hymamba", size=args.size, num_classes=14).to(device).eval()
    if args.compile:
        from mambamim.inference import compile_segmenter

        model = compile_segmenter(model)
    info = {"num_classes": 14, "in_channels": 1, "roi_size": args.roi,
            "preprocessing": {"spacing": [args.spacing] * 3, "hu_min": -175.0, "hu_max": 250.0,
                              "crop_foreground": True, "min_size": [args.roi] * 3, "crop_margin": 4}}
    predict_files(model, info, os.path.join(folder, "ct0.nii.gz"), os.path.join(root, "warm"), device=device)
    rows = []
    for ahead in (0, 1, 2) * 2:  # 0: one stage after another; else overlapped, reading that many cases ahead
        res = predict_files(model, info, folder, os.path.join(root, f"out{len(rows)}"), device=device,
                            overlap_io=ahead > 0, read_ahead=max(1, ahead))
        assert len(res.written) == args.cases, res.failed
        rows.append((ahead, res.seconds / args.cases))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{args.cases} CTs of 512x512x200 at 0.78x0.78x2 mm, {args.size} HyMamba, {args.spacing} mm, roi {args.roi}, "
          f"{name}" + (", compiled" if args.compile else ""))
    print("| mode | s per case |\n| --- | ---: |")
    for ahead, secs in rows:
        mode = f"overlapped, reading {ahead} case(s) ahead" if ahead else "one stage after another"
        print(f"| {mode} | {secs:.3f} |")


if __name__ == "__main__":
    main()
