"""The words of the start-of-run lines: precision and processes in plain terms, not option values."""

from __future__ import annotations

import argparse

import pytest

from mambamim.engine.banner import precision_words, processes_words, tta_words, window_words


def test_banner_words():
    assert precision_words("none") == "precision fp32 (no autocast)"
    assert precision_words("bf16") == "precision bf16 autocast (mixed precision)"
    assert "fp16 autocast" in precision_words("FP16")
    assert processes_words(1) == "1 process"
    assert processes_words(1, "cpu") == "1 process on cpu"
    assert processes_words(4, "cuda:0") == "4 processes (one per GPU, data parallel)"
    assert processes_words(2, "cpu") == "2 processes (data parallel)"
    with pytest.raises(ValueError):
        processes_words(0)
    assert window_words((96, 96, 64), 0.5) == "sliding window 96x96x64 voxels, 50% overlap"
    assert tta_words("none") == "no test-time flips" and "8 passes" in tta_words(True)


def test_amp_help_explains_none():
    from mambamim.cli import cmd_finetune, cmd_pretrain

    for mod in (cmd_pretrain, cmd_finetune):
        parser = argparse.ArgumentParser()
        mod.add_arguments(parser)
        amp = next(a for a in parser._actions if "--amp" in a.option_strings)
        assert "none = fp32, no autocast" in amp.help
