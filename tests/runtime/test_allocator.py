"""The CLI's CUDA allocator default: expandable segments unless the user chose a setting."""

from __future__ import annotations

import os
import subprocess
import sys

from mambamim.cli.main import main
from mambamim.runtime.allocator import ALLOC_CONF, DEFAULT_ALLOC_CONF, apply_allocator_defaults


def test_default_fills_an_unset_variable():
    env: dict[str, str] = {}
    assert apply_allocator_defaults(env) == DEFAULT_ALLOC_CONF
    assert env == {ALLOC_CONF: DEFAULT_ALLOC_CONF}


def test_a_users_setting_is_kept_even_when_empty():
    for mine in ("max_split_size_mb:128", ""):
        env = {ALLOC_CONF: mine}
        assert apply_allocator_defaults(env) == mine
        assert env == {ALLOC_CONF: mine}


def test_the_cli_sets_it_before_the_command_runs(monkeypatch):
    monkeypatch.setenv(ALLOC_CONF, "placeholder")
    monkeypatch.delenv(ALLOC_CONF)
    assert main(["data"]) == 2  # prints the data help
    assert os.environ[ALLOC_CONF] == DEFAULT_ALLOC_CONF


def test_the_module_imports_no_torch():
    """The CLI imports it before any command: it must not start torch (which would read the variable)."""
    code = "import sys, mambamim.runtime.allocator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
