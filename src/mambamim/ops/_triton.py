"""Triton is optional (CPU-only installs and CI have none): the kernel modules import it from here."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["triton", "tl", "HAS_TRITON", "is_available"]


def is_available() -> bool:
    """True when Triton is importable and a CUDA device is present."""
    return HAS_TRITON and torch.cuda.is_available()
