"""The CLI answers at once: building the parser and every ``--help`` import no heavy library
(torch, MONAI, numpy, matplotlib, nibabel, ...); those load only inside a command's ``run``.

These tests check which modules get imported, not how long it takes (timings belong in
benchmarks): each runs a fresh interpreter, since this test process has torch loaded already.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from mambamim.cli.main import COMMANDS, DATA_COMMANDS, build_parser, main

HEAVY = ("torch", "monai", "numpy", "scipy", "matplotlib", "nibabel", "pydicom", "SimpleITK", "triton")

SUBCOMMANDS = [[name] for name, _, _ in COMMANDS] + [["data"]] + [["data", name] for name, _, _ in DATA_COMMANDS]


def _python(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def _imported_by_importtime(stderr: str) -> set[str]:
    """Top-level package names in ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") >= 2:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


def test_building_the_parser_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from mambamim.cli.main import build_parser\n"
        "build_parser().format_help()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = _python("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"building the parser imported: {out.stdout.strip()}"


def test_importing_mambamim_imports_nothing_heavy():
    out = _python("-c", f"import sys, mambamim; print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("command", [[]] + SUBCOMMANDS, ids=lambda c: " ".join(c) or "top-level")
def test_help_imports_nothing_heavy(command):
    out = _python("-X", "importtime", "-m", "mambamim", *command, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: mambamim")
    heavy = sorted(_imported_by_importtime(out.stderr) & set(HEAVY))
    assert not heavy, f"`mambamim {' '.join(command)} --help` imported {heavy}"


def _subparsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, path + (name,))


def test_every_option_has_help_and_required_options_say_so():
    missing, unmarked = [], []
    for path, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"mambamim {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(where)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.required and action.option_strings:
                if "required" not in (formatter._get_help_string(action) or ""):
                    unmarked.append(f"mambamim {' '.join(path)} {action.option_strings[0]}")
    assert not missing, f"options without help: {missing}"
    assert not unmarked, f"required options not shown as required: {unmarked}"


def test_required_options_show_as_required(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    text = capsys.readouterr().out
    assert "dataset.json (required)" in text and "finished cases) (required)" in text


def test_demo_help_defaults_match_the_engine():
    from mambamim.cli.cmd_demo import DEFAULTS
    from mambamim.demo import DemoSettings

    settings = DemoSettings()
    assert DEFAULTS == {k: getattr(settings, k) for k in DEFAULTS}


def test_info_choices_match_the_model_registry():
    from mambamim.cli.cmd_info import MODELS, SIZES
    from mambamim.models import MODEL_PRESETS, list_models

    assert sorted(MODELS) == sorted(list_models())
    assert set(SIZES) == {size for presets in MODEL_PRESETS.values() for size in presets}


def test_info_default_on_tiny_is_quick_and_prints_parameter_counts(capsys):
    assert main(["info", "--size", "tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "parameters 0.29 M (encoder 0.14 M" in out
    for group in ("encoder.stem", "encoder.skip_blocks", "encoder.mamba", "up_blocks", "head"):
        assert f"  {group} " in out
    # the default times a small crop, not the 96^3 training crop
    assert "(1, 1, 32, 32, 32)" in out and "96, 96" not in out
    assert "second step" in out and "--benchmark" in out


def test_info_parameter_groups_add_up():
    import torch

    from mambamim.cli.cmd_info import parameter_groups
    from mambamim.models import create_model

    torch.manual_seed(0)
    for name in ("hymamba", "vim_unetr"):
        model = create_model(name, size="tiny")
        assert sum(n for _, n in parameter_groups(model)) == sum(p.numel() for p in model.parameters())


def test_info_no_timing_only_counts(capsys):
    assert main(["info", "--model", "mednext_cnn", "--size", "tiny", "--no-timing", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "forward+backward" not in out


def test_info_benchmark_shows_progress(capsys):
    assert main(["info", "--size", "tiny", "--benchmark", "--crop", "32", "--steps", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "[1/3] forward" in captured.err and "[3/3] forward" in captured.err and "backward ..." in captured.err
    assert "step 3" in captured.out and "mean of steps 2-3" in captured.out


@pytest.mark.parametrize("argv", [["--crop", "30"], ["--steps", "0", "--benchmark"], ["--model", "vim_unetr",
                                                                                      "--size", "authors"]])
def test_info_bad_arguments_exit_2(argv, capsys):
    assert main(["info", "--size", "tiny", "--device", "cpu", *argv] if "--size" not in argv else
                ["info", "--device", "cpu", *argv]) == 2
