"""``mambamim reconstruct``: the paper's Fig. 9 from a pre-training checkpoint.

Preprocesses the image with the run's preprocessing, takes a centred crop of the model's training
size, masks it with a seeded random bottleneck mask and renders masked input / reconstruction /
original in three planes as one PNG.
"""

from __future__ import annotations

import argparse

from mambamim.cli.cmd_predict import add_device_arguments, error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="pre-training checkpoint (RUN/checkpoints/last.pt) or the pre-training run folder")
    parser.add_argument("--input", required=True, help="a NIfTI file or a DICOM series folder")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--mask-ratio", type=float, default=None, help="fraction masked (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask (default 0)")
    parser.add_argument("--crop", type=int, default=None, help="crop side, a multiple of 16 (default: the run's)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from mambamim.api import reconstruct_file

    try:
        res = reconstruct_file(args.checkpoint, args.input, args.out, mask_ratio=args.mask_ratio, seed=args.seed,
                               crop=args.crop, device=args.device, amp=args.amp)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # DataError is a ValueError
        return error("reconstruct", str(exc))
    print(f"wrote {res['png']} ({res['crop']}^3 crop, {res['visible']}/{res['tokens']} tokens visible, "
          f"masked-patch loss {res['loss']:.4f})")
    return 0
