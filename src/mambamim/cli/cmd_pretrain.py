"""``mambamim pretrain``: MambaMIM masked-image-modeling pre-training (thin over
:func:`mambamim.engine.pretrain_loop.pretrain`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from mambamim.models.registry import PATCH_SIZE, get_entry, list_models, list_sizes, pretrainable_models


def add_common_training_arguments(parser: argparse.ArgumentParser, *, batch_default: int, wd_default: float,
                                  models: Sequence[str] | None = None) -> None:
    """Options shared by ``pretrain`` and ``finetune``; ``--model`` offers ``models`` (default: every model of
    the registry), ``--size`` every size of the registry."""
    parser.add_argument("--data", help="a prepared cache folder (or its dataset.json), a Decathlon dataset.json, "
                                       "or a folder of NIfTI / DICOM (prepared into RUN/cache)")
    parser.add_argument("--out", help="run folder (created; one that already holds a run is refused unless "
                                      "--resume or --overwrite)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="RUN", help="continue the run in RUN exactly where it stopped: its saved "
                                                       "options are kept; options given here may change the device, "
                                                       "workers, --stop-after, logging and speed settings, not the "
                                                       "training")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in an --out that already holds a run: its files are moved into "
                            "OUT/.overwritten-<timestamp>/ first")
    parser.add_argument("--model", default="hymamba", choices=list(models or list_models()),
                        help="network (default hymamba)")
    parser.add_argument("--size", "--arch", dest="size", default="base", choices=list_sizes(),
                        help="network preset: base = the paper's configuration (ours), authors = the authors' "
                             "released HyMamba exactly (loads `mambamim convert authors` checkpoints), tiny for "
                             "tests and CPU demos")
    parser.add_argument("--scan", default="raster", choices=["raster", "zigzag", "hilbert", "shuffle"],
                        help="Mamba scan order (default raster)")
    parser.add_argument("--batch-size", type=int, default=batch_default,
                        help=f"crops per step and process, a multiple of --num-crops (default {batch_default})")
    parser.add_argument("--num-crops", type=int, default=4, help="random crops per volume (default 4)")
    parser.add_argument("--crop", type=int, default=None,
                        help=f"crop side in voxels, a multiple of {PATCH_SIZE} (default: the model's, 96 for every "
                             "registered model)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=wd_default, help=f"AdamW weight decay (default {wd_default})")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of the run)")
    parser.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm, 0 disables (default 1.0)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step (channels-last 3D on CUDA): fastest on GPUs")
    parser.add_argument("--memory-budget", type=float, default=1.0, metavar="F",
                        help="with --compile: keep at most about this fraction (0-1] of the activations the compiled "
                             "step would save, recomputing elementwise ops in the backward pass (default 1 = off; 0.4: the base "
                             "step in 9.5 GiB allocated / 14.1 GiB reserved instead of 16 / 18.6, 13%% slower, on an H100)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                        help="mixed precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 / fp16 = that autocast; "
                             "none = fp32, no autocast (default auto)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes (default 4)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between metrics rows (default 10)")
    parser.add_argument("--checkpoint-steps", type=int, default=0, help="also rewrite last.pt every N steps")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="end this session after N steps with a checkpoint (resume later); the schedule is unchanged")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_EXPLICIT = "explicit_options"  # namespace attribute: the dests of the options typed on the command line


def _recording(cls: type) -> type:
    class Recording(cls):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
            setattr(namespace, _EXPLICIT, frozenset(getattr(namespace, _EXPLICIT, None) or ()) | {self.dest})
            super().__call__(parser, namespace, values, option_string)

    Recording.__name__ = f"Recording{cls.__name__}"
    return Recording


def track_explicit(parser: argparse.ArgumentParser) -> None:
    """Call after the last ``add_argument``: every option of ``parser`` records that the command line
    gave it (in ``args.explicit_options``; see :func:`explicit_fields`), so that ``--resume`` keeps the
    run's saved value of every other option. The namespace keeps the plain values and defaults."""
    for action in parser._actions:  # argparse keeps no public list of a parser's actions
        if action.option_strings and action.dest != "help":
            action.__class__ = _recording(type(action))
    parser.set_defaults(**{_EXPLICIT: frozenset()})


# options whose flag is the negation of the configuration field
_NEGATED = {"no_progress": "progress", "no_skip": "skip", "no_bottom_up": "bottom_up", "no_augment": "augment"}


def explicit_fields(args: argparse.Namespace) -> set[str] | None:
    """The configuration fields given on the command line (None: ``args`` was not parsed by a
    :func:`track_explicit` parser, so it is unknown)."""
    given = getattr(args, _EXPLICIT, None)
    if given is None:
        return None
    return {_NEGATED.get(name, name) for name in given}


def common_values(args: argparse.Namespace) -> dict:
    return dict(
        data=args.data or "", out=args.out or "", model=args.model, size=args.size, scan=args.scan,
        batch_size=args.batch_size, num_crops=args.num_crops, crop=get_entry(args.model).default_crop if args.crop is None else args.crop,
        lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, clip_grad=args.clip_grad,
        amp=args.amp, compile=args.compile, memory_budget=args.memory_budget, device=args.device, seed=args.seed,
        workers=args.workers, log_every=args.log_every,
        checkpoint_steps=args.checkpoint_steps, stop_after=args.stop_after, progress=not args.no_progress,
        resume=args.resume, overwrite=args.overwrite,
    )


def check_paths(args: argparse.Namespace, command: str) -> str | None:
    if args.resume:
        return None
    if not args.data or not args.out:
        return f"mambamim {command}: --data and --out are required (or --resume RUN)"
    return None


def run_training_command(args: argparse.Namespace, command: str, make_config: Callable[[], Any],
                         train: Callable[[Any], Path], explicit: set[str] | None = None) -> Path | int:
    """What ``pretrain`` and ``finetune`` share: check --data/--out, build the configuration
    (validated; with --resume, the run's saved one with the ``explicit`` options merged in, see
    :func:`mambamim.engine.run_folder.resolve_resume`), train, and turn known errors into a
    message and an exit code.

    Returns:
        The run folder, or the exit code to return: 2 missing paths, 1 bad options / data /
        checkpoint or a non-finite loss, 130 interrupted (resumable).
    """
    from mambamim.engine.checkpoint import CheckpointError
    from mambamim.engine.loop import NonFiniteLossError, TrainingInterrupted
    from mambamim.engine.run_folder import resolve_resume

    problem = check_paths(args, command)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        config = make_config()
        if args.resume:
            config = resolve_resume(config, type(config), explicit=explicit)
        else:
            config.validate()
        return train(config)
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError) as exc:  # EncoderMismatchError too
        print(f"mambamim {command}: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"mambamim {command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"mambamim {command}: aborted; continue with --resume RUN from the last checkpoint", file=sys.stderr)
        return 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_training_arguments(parser, batch_default=8, wd_default=0.05, models=pretrainable_models())
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of bottleneck tokens masked (default 0.75)")
    parser.add_argument("--token", default="toki", choices=["toki", "learnable"],
                        help="how masked Mamba tokens are filled: TOKI or one learnable token")
    parser.add_argument("--no-skip", action="store_true", help="decoder without skip connections (ablation)")
    parser.add_argument("--no-bottom-up", action="store_true", help="mask the Mamba stage only, CNN dense (ablation)")
    parser.add_argument("--sparse-full-res", action=argparse.BooleanOptionalAction, default=None,
                        help="compute the stem, the full-resolution encoder layer and the decoder skip projection "
                             f"from the visible {PATCH_SIZE}^3 cells only: same result, less work and memory (default: on "
                             "wherever it applies)")
    parser.add_argument("--sparse-levels", type=int, choices=(1, 2, 3), default=None,
                        help="with the sparse path: encoder levels computed on visible cells, 1 (full resolution) "
                             "to 3 (default: 2 with --cuda-graphs, else 1, the faster of each on an H100)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --compile on one GPU: replay the compiled step as CUDA graphs, which removes the "
                             "kernel-launch gaps (a base step took 0.146 s instead of 0.152 s on an H100)")
    parser.add_argument("--decoder-width", type=int, default=None,
                        help="light decoder width at the bottleneck, halving per level (default 768)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="passes over the data (default 100)")
    length.add_argument("--steps", type=int, default=None, help="optimiser steps (instead of --epochs)")
    parser.add_argument("--save-every", type=int, default=10, help="keep a checkpoint every N epochs (default 10, 0: none)")
    parser.add_argument("--vis-every", type=int, default=5, help="reconstruction PNG every N epochs (default 5, 0: none)")
    parser.add_argument("--cases", nargs="+", default=None, help="train on these cache case ids only")
    track_explicit(parser)


def run(args: argparse.Namespace) -> int:
    from mambamim.engine.config import PretrainConfig
    from mambamim.engine.pretrain_loop import pretrain

    run_dir = run_training_command(args, "pretrain", lambda: PretrainConfig(
        **common_values(args), cuda_graphs=args.cuda_graphs, mask_ratio=args.mask_ratio, token=args.token, skip=not args.no_skip,
        bottom_up=not args.no_bottom_up, decoder_width=args.decoder_width,
        sparse_full_res=args.sparse_full_res, sparse_levels=args.sparse_levels, epochs=args.epochs if args.epochs is not None else (None if args.steps else 100),
        steps=args.steps, save_every=args.save_every, vis_every=args.vis_every, cases=args.cases,
    ), pretrain, explicit_fields(args))
    if isinstance(run_dir, int):
        return run_dir
    print(f"pre-training run: {run_dir}\nencoder for fine-tuning: {run_dir / 'encoder.pt'}")
    return 0
