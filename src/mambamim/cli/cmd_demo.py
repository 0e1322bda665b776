"""``mambamim demo``: the whole pipeline on synthetic data, on CPU in minutes.

Unlabelled and labelled synthetic phantoms -> cache -> MambaMIM pre-training of a tiny HyMamba ->
fine-tuning on a few labelled cases from scratch and from the pre-trained encoder (best checkpoint by
validation Dice) -> evaluation of both on held-out test cases -> paired comparison -> ``OUT/report.md``.
"""

from __future__ import annotations

import argparse
import time

from mambamim.cli.cmd_predict import error

# The defaults of mambamim.demo.DemoSettings, written out so that building the parser does not
# import the engine (and torch); tests/cli/test_fast_help.py checks that they match.
DEFAULTS = dict(num_unlabeled=48, num_train=3, num_val=2, num_test=8, crop=32, pretrain_steps=150,
                finetune_iterations=230, model="hymamba", size="mini", seed=0, repeats=1)
_HELP = dict(num_unlabeled="unlabelled phantoms (pre-training only)", num_train="labelled cases that fine-tune",
             num_val="labelled cases that pick the best checkpoint", num_test="labelled held-out test cases",
             crop="crop side, multiple of 16", pretrain_steps="pre-training steps",
             finetune_iterations="fine-tuning iterations per run", model="network", size="network size preset",
             seed="seed of data, masks and weights",
             repeats="fine-tuning runs per arm, seeds SEED, SEED+1, ...; > 1 adds a test over runs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="mambamim-demo", help="output folder (default ./mambamim-demo)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    parser.add_argument("--quick", action="store_true", help="the smallest setting that runs every stage (smoke test)")
    for name, default in DEFAULTS.items():
        kind = str if isinstance(default, str) else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"{_HELP[name]} (default {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="any other DemoSettings field, e.g. --set lr_finetune=0.005 --set spacing=4 (repeatable)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from mambamim.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    for name in DEFAULTS:
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    try:
        for item in args.overrides:
            settings.set_from_text(item)
        settings.validate()
    except ValueError as exc:
        return error("demo", str(exc))
    t0 = time.perf_counter()
    result = run_demo(args.out, device=args.device, settings=settings, progress=args.progress)
    dt = time.perf_counter() - t0
    print("mean Dice on held-out test cases: " + ", ".join(f"{k} {v:.4f}" for k, v in result.mean_dice.items()))
    print(result.verdict)
    print("stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    print(f"demo finished in {dt:.0f} s; report: {result.report}")
    return 0
