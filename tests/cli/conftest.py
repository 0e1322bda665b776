"""Fixtures for the CLI tests."""

from __future__ import annotations

import pytest

from _cli_toys import ThresholdSegmenter, toy_info


@pytest.fixture
def toy_segmenter(monkeypatch):
    """Make ``load_segmenter`` return the toy model for any existing checkpoint path."""
    from mambamim.engine import inference

    state = {"info": toy_info()}

    def fake(path, device="auto"):
        import os

        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return ThresholdSegmenter().eval(), state["info"]

    monkeypatch.setattr(inference, "load_segmenter", fake)
    return state


