"""``mambamim data synth``: write a synthetic CT phantom set (NIfTI + labels + dataset.json)."""

from __future__ import annotations

import argparse
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--num", type=int, default=20, help="number of volumes (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--unlabeled", action="store_true", help="images only (for pre-training)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes writing volumes in parallel (default: CPU count, at most 4)")
    parser.add_argument("--prefix", default="synth", help="file name prefix (default 'synth')")
    parser.add_argument("--inplane-voxels", type=int, nargs=2, default=(96, 160), metavar=("MIN", "MAX"),
                        help="in-plane size range in voxels (default 96 160)")
    parser.add_argument("--inplane-spacing", type=float, nargs=2, default=(2.0, 3.0), metavar=("MIN", "MAX"),
                        help="target in-plane spacing range in mm (default 2.0 3.0)")
    parser.add_argument("--slice-spacing", type=float, nargs=2, default=(2.5, 5.0), metavar=("MIN", "MAX"),
                        help="slice spacing range in mm (default 2.5 5.0)")


def run(args: argparse.Namespace) -> int:
    from mambamim.data.synth import synth_dataset

    t0 = time.perf_counter()
    try:
        meta = synth_dataset(args.out, num=args.num, seed=args.seed, unlabeled=args.unlabeled, prefix=args.prefix,
                             workers=args.workers, inplane_voxels=tuple(args.inplane_voxels),
                             inplane_spacing=tuple(args.inplane_spacing), slice_spacing=tuple(args.slice_spacing))
    except ValueError as exc:
        print(f"mambamim data synth: {exc}")
        return 2
    kind = "unlabeled " if args.unlabeled else ""
    print(f"wrote {meta['numTraining']} {kind}synthetic CT volumes to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0
