"""``mambamim demo``: the whole pipeline on synthetic data, on CPU in minutes.

Synthetic phantoms -> cache -> MambaMIM pre-training of a tiny HyMamba -> fine-tuning from scratch
and from the pre-trained encoder -> evaluation of both -> paired comparison -> ``OUT/report.md``.
"""

from __future__ import annotations

import argparse
import time

from mambamim.cli.cmd_predict import error

# The defaults of mambamim.engine.demo.DemoSettings, written out so that building the parser does not
# import the engine (and torch); tests/cli/test_fast_help.py checks that they match.
DEFAULTS = dict(num_cases=10, num_test=3, crop=32, pretrain_steps=100, finetune_iterations=300, model="hymamba",
                size="tiny", seed=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = argparse.Namespace(**DEFAULTS)
    parser.add_argument("--out", default="mambamim-demo", help="output folder (default ./mambamim-demo)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    parser.add_argument("--quick", action="store_true", help="the smallest setting that runs every stage (smoke test)")
    parser.add_argument("--num-cases", type=int, default=None, help=f"synthetic volumes (default {d.num_cases})")
    parser.add_argument("--num-test", type=int, default=None, help=f"held-out cases (default {d.num_test})")
    parser.add_argument("--crop", type=int, default=None, help=f"crop side, multiple of 16 (default {d.crop})")
    parser.add_argument("--pretrain-steps", type=int, default=None, help=f"default {d.pretrain_steps}")
    parser.add_argument("--finetune-iterations", type=int, default=None, help=f"default {d.finetune_iterations}")
    parser.add_argument("--model", default=None, help=f"network (default {d.model})")
    parser.add_argument("--size", default=None, help=f"network size preset (default {d.size})")
    parser.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from mambamim.engine.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    for name in ("num_cases", "num_test", "crop", "pretrain_steps", "finetune_iterations", "model", "size", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    try:
        settings.validate()
    except ValueError as exc:
        return error("demo", str(exc))
    t0 = time.perf_counter()
    result = run_demo(args.out, device=args.device, settings=settings, progress=args.progress)
    dt = time.perf_counter() - t0
    print("mean Dice on held-out cases: " + ", ".join(f"{k} {v:.4f}" for k, v in result.mean_dice.items()))
    print("stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    print(f"demo finished in {dt:.0f} s; report: {result.report}")
    return 0
