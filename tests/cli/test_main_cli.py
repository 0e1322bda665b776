import subprocess
import sys

import pytest

from mambamim import __version__
from mambamim.cli.main import COMMANDS, DATA_COMMANDS, build_parser, main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    help_text = build_parser().format_help()
    for name, _, _ in COMMANDS:
        assert name in help_text
    assert "data" in help_text


def test_every_subcommand_has_help(capsys):
    for name, _, _ in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
    for name, _, _ in DATA_COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main(["data", name, "--help"])
        assert exc.value.code == 0


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mambamim", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_info_builds_and_times_a_network(capsys):
    assert main(["info", "--model", "hymamba", "--size", "tiny", "--crop", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "second step" in out
    assert "fast paths: none on CPU" in out


def test_info_names_the_fast_paths_a_gpu_would_get(monkeypatch):
    import torch

    from mambamim.cli.cmd_info import fast_paths

    monkeypatch.setenv("MAMBAMIM_DISABLE_TRITON", "dwconv")
    text = fast_paths(torch.device("cuda"))
    # with triton installed the scan stays on and the switched-off kernel says so; without, it says why
    assert "depthwise conv off" in text or "triton is not installed" in text


def test_bad_arguments_exit_non_zero(capsys):
    assert main(["info", "--crop", "30"]) == 2
