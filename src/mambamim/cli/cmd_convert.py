"""``mambamim convert authors CKPT OUT``: the authors' MambaMIM pre-training checkpoint as our encoder.pt
(thin over :func:`mambamim.models.pretrained.convert_authors_state`); ``finetune --size authors
--pretrained OUT`` then loads every encoder tensor."""

from __future__ import annotations

import argparse
import os
import sys

from mambamim.cli.cmd_predict import error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=["authors"],
                        help="checkpoint format: authors = FengheTan9/MambaMIM's encoder file "
                             "(…_timm_style.pth) or their resume file (…withdecoder….pth)")
    parser.add_argument("checkpoint", metavar="CKPT", help="the file to convert (read on the CPU)")
    parser.add_argument("out", metavar="OUT", help="our encoder checkpoint to write (e.g. encoder.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from mambamim.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from mambamim.models.pretrained import AUTHORS_MODEL, convert_authors_state

    if os.path.exists(args.out) and not args.overwrite:
        return error("convert", f"{args.out} exists; pass --overwrite to replace it")
    try:
        state = load_checkpoint(args.checkpoint)
        weights, report = convert_authors_state(state)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        return error("convert", str(exc))
    if not report.ok:
        return error("convert", f"{args.checkpoint} does not match the authors' encoder:\n{report.summary()}")
    numbers = sum(v.numel() for v in weights.values())
    try:
        save_checkpoint(args.out, {
            "format": "mambamim-encoder", "version": 2, "encoder": weights, "model": AUTHORS_MODEL,
            "converted_from": {"path": os.path.abspath(args.checkpoint), "format": args.source,
                               "report": report.to_dict()},
            "preprocessing": None,
        })  # fmt: skip
    except OSError as exc:
        return error("convert", f"cannot write {args.out}: {exc}")
    print(report.summary())
    print(f"wrote {args.out}: {len(weights)} encoder tensors ({numbers / 1e6:.2f} M parameters); fine-tune with "
          f"`mambamim finetune --size authors --pretrained {args.out} ...`", file=sys.stdout)
    return 0
