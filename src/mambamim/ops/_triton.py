"""Triton is optional (CPU-only installs and CI have none): the kernel modules import it from here.

The kernels use ``tl.join``, ``tl.permute``, ``tl.flip`` and ``tl.associative_scan(reverse=...)``, which
Triton 3.0 introduced; with an older Triton installed ``HAS_TRITON`` is False and every op takes its
PyTorch path instead of failing to compile on the GPU.
"""

from __future__ import annotations

import logging
import re
from typing import Tuple

import torch

logger = logging.getLogger(__name__)

MIN_TRITON = (3, 0)


def version_tuple(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '3.0.0+git1a2b': missing parts count as 0."""
    numbers = [int(m.group(0)) for m in (re.match(r"\d+", p) for p in version.split(".")[:2]) if m]
    major, minor = (numbers + [0, 0])[:2]
    return major, minor


try:
    import triton
    import triton.language as tl

    HAS_TRITON = version_tuple(triton.__version__) >= MIN_TRITON
    if not HAS_TRITON:
        logger.warning("triton %s is older than %d.%d: the PyTorch paths run instead of the Triton kernels",
                       triton.__version__, *MIN_TRITON)
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["triton", "tl", "HAS_TRITON", "MIN_TRITON", "is_available", "version_tuple"]


def is_available() -> bool:
    """True when a Triton of at least ``MIN_TRITON`` is importable and a CUDA device is present."""
    return HAS_TRITON and torch.cuda.is_available()
