"""Where a training step makes the host wait for the GPU.

Runs ``mambamim pretrain`` (or ``finetune``) in this process with ``torch.cuda.set_sync_debug_mode("warn")``
switched on from step ``--from-step`` on, so set-up, compilation and the first steps do not count, and
prints each place that synchronised, with how often and the innermost frames of mambamim and torch code.
A step with only the intended sync shows one place: ``packed.tolist()`` in ``TrainLoop.backward_step``.

    python benchmarks/sync_audit.py -- pretrain --data cache --out run --size base --crop 96 \
        --batch-size 8 --steps 8 --compile --device cuda --no-progress --vis-every 0

Needs CUDA (the debug mode exists only there).
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings

import torch

from mambamim.cli.main import main as cli_main
from mambamim.engine.loop import TrainLoop


def _frames(limit: int) -> str:
    keep = [f for f in traceback.extract_stack()[:-2] if "mambamim" in f.filename or "/torch/" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(keep[-limit:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-step", type=int, default=3, help="optimiser steps done before auditing")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="after --: the mambamim command line")
    args = parser.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    if not torch.cuda.is_available():
        sys.exit("sync_audit needs CUDA")

    seen: collections.Counter = collections.Counter()
    orig_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            seen[_frames(args.frames)] += 1
        else:
            orig_show(message, category, filename, lineno, file, line)

    original = TrainLoop.backward_step
    steps = {"audited": 0}

    def backward_step(self, *a, **kw):
        if self.step == args.from_step:
            torch.cuda.set_sync_debug_mode("warn")
        if self.step >= args.from_step:
            steps["audited"] += 1
        return original(self, *a, **kw)

    warnings.showwarning = show
    warnings.simplefilter("always")
    TrainLoop.backward_step = backward_step  # a diagnostic tool, never the library
    try:
        rc = cli_main(cli)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        TrainLoop.backward_step = original
        warnings.showwarning = orig_show
    print(f"exit {rc}; {steps['audited']} steps audited (from step {args.from_step}); "
          f"{sum(seen.values())} synchronising calls at {len(seen)} places")
    print("| calls | where (innermost first) |\n| ---: | --- |")
    for where, n in seen.most_common():
        print(f"| {n} | {where} |")


if __name__ == "__main__":
    main()
