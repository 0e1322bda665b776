"""The ``mambamim`` command: a thin layer over typed Python functions.

Each subcommand lives in its own module ``mambamim.cli.cmd_<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``. A subcommand whose module is
not there yet is still listed (with its help) and says plainly that it is not
built, exiting with status 2.

Building the parser must stay cheap (``mambamim --help`` answers at once): the command modules
import torch, MONAI, numpy, matplotlib, nibabel ... only inside their ``run`` functions
(tests/cli/test_fast_help.py checks it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from mambamim import __version__

# (name, module suffix, help). ``data`` has its own sub-subcommands.
COMMANDS: list[tuple[str, str, str]] = [
    ("pretrain", "pretrain", "MambaMIM masked-image-modeling pre-training on unlabeled CT"),
    ("finetune", "finetune", "fine-tune a segmentation network, optionally from a pre-trained encoder"),
    ("evaluate", "evaluate", "per-case and per-class Dice / HD95 of a checkpoint on labeled data"),
    ("predict", "predict", "segment NIfTI or DICOM inputs; label maps come out in each input's own geometry"),
    ("reconstruct", "reconstruct", "render masked input / reconstruction / original (paper Fig. 9) as PNG"),
    ("compare", "compare", "per-class means of two evaluations with paired t-test and Wilcoxon p-values"),
    ("demo", "demo", "the whole pipeline on synthetic data, on CPU in minutes"),
    ("convert", "convert", "turn the authors' MambaMIM checkpoint into our encoder checkpoint"),
    ("info", "info", "build a network, print its parameter counts per module group and time a small crop "
                     "(--benchmark: the training crop)"),
]
DATA_COMMANDS: list[tuple[str, str, str]] = [
    ("synth", "data_synth", "write a synthetic CT phantom set (NIfTI, labels, dataset.json)"),
    ("prepare", "data_prepare", "check and preprocess NIfTI / DICOM / nnU-Net / Decathlon data into a fast cache"),
]


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ``(required)`` after the help of every required option."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if action.required and action.option_strings and text and "required" not in text:
            text = f"{text} (required)"
        return text


def _register(subparsers, name: str, module: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    mod = importlib.import_module(f"mambamim.cli.cmd_{module}")
    mod.add_arguments(parser)
    parser.set_defaults(func=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambamim",
        description="MambaMIM pre-training, fine-tuning and inference for 3D medical image segmentation.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mambamim {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data = sub.add_parser("data", help="data tools: synthetic phantoms and preprocessing", description="data tools",
                          formatter_class=HelpFormatter)
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    for name, module, help_text in DATA_COMMANDS:
        _register(data_sub, name, module, help_text)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])
    for name, module, help_text in COMMANDS:
        _register(sub, name, module, help_text)
    return parser


# The option naming each command's output folder: checked before the command runs, so a file or a read-only
# folder there is one line, not a traceback from deep inside.
OUTPUT_FOLDERS: dict[str, str] = {
    "pretrain": "out", "finetune": "out", "evaluate": "out", "compare": "out", "demo": "out",
    "predict": "output", "data prepare": "out", "data synth": "out",
}


def _error_line(exc: BaseException) -> str:
    """One line for an input / output error: ``path: problem``."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mambamim`` command. Input and output errors (``DataError``, ``OSError``) that a command does
    not handle itself become one line ``mambamim <command>: <path>: <problem>`` and exit status 1 (``-vv``
    shows the traceback instead)."""
    from mambamim.data.errors import DataError, output_dir_problem
    from mambamim.runtime.allocator import apply_allocator_defaults

    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    name = " ".join(n for n in (args.command, getattr(args, "data_command", None)) if n)
    option = OUTPUT_FOLDERS.get(name)
    out = getattr(args, option, None) if option else None
    if isinstance(out, (str, os.PathLike)) and str(out):
        problem = output_dir_problem(out, f"--{option}")
        if problem:
            print(f"mambamim {name}: {os.path.abspath(os.path.expanduser(out))}: {problem}", file=sys.stderr)
            return 1
    apply_allocator_defaults()  # before the command imports torch
    try:
        return int(args.func(args) or 0)
    except (DataError, OSError) as exc:
        if args.verbose >= 2:
            raise
        print(f"mambamim {name}: {_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
