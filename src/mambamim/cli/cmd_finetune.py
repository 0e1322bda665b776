"""``mambamim finetune``: segmentation fine-tuning, optionally from a pre-trained encoder (thin
over :func:`mambamim.engine.finetune_loop.finetune`)."""

from __future__ import annotations

import argparse

from mambamim.cli.cmd_pretrain import (add_common_training_arguments, common_values, run_training_command,
                                       explicit_fields, track_explicit)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_training_arguments(parser, batch_default=8, wd_default=1e-5)
    parser.add_argument("--pretrained", metavar="ENCODER_OR_CKPT",
                        help="encoder.pt or a run folder / checkpoint of mambamim pretrain; loaded strictly by name")
    parser.add_argument("--allow-partial", action="store_true",
                        help="load only the encoder tensors that match by name and shape (the rest is reported)")
    parser.add_argument("--iterations", type=int, default=50_000, help="optimiser steps (default 50000)")
    parser.add_argument("--val-every", type=int, default=500, help="validate every K iterations (default 500, 0: never)")
    parser.add_argument("--fold", type=int, default=None,
                        help="validation fold k of --num-folds (default: the dataset's validation list, else fold 0; -1: none)")
    parser.add_argument("--num-folds", type=int, default=5, help="folds for cross-validation (default 5)")
    parser.add_argument("--val-cases", metavar="FILE", help="validation case ids (one a line, or a JSON list)")
    parser.add_argument("--roi", type=int, default=None, help="sliding-window side (default: --crop)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass in validation")
    parser.add_argument("--no-augment", action="store_true", help="no flips / rotations / intensity jitter")
    track_explicit(parser)


def run(args: argparse.Namespace) -> int:
    from mambamim.engine.config import FinetuneConfig
    from mambamim.engine.finetune_loop import finetune

    run_dir = run_training_command(args, "finetune", lambda: FinetuneConfig(
        **common_values(args), pretrained=args.pretrained, allow_partial=args.allow_partial,
        iterations=args.iterations, val_every=args.val_every, fold=args.fold, num_folds=args.num_folds,
        val_cases=args.val_cases, roi=args.roi, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
        augment=not args.no_augment,
    ), finetune, explicit_fields(args))
    if isinstance(run_dir, int):
        return run_dir
    best = run_dir / "checkpoints" / "best.pt"
    print(f"fine-tuning run: {run_dir}\nmodel: {best if best.exists() else run_dir / 'checkpoints' / 'last.pt'}")
    return 0
