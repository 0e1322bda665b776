"""Shared output of the benchmark scripts (run as ``python benchmarks/<script>.py``, so this folder is on
``sys.path``)."""

from __future__ import annotations

import os


def save_table(text: str, name: str) -> None:
    """Also write a printed markdown table to ``$OUT/<name>`` when OUT is set (the device tool's output folder)."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
