"""MambaMIM: masked image modeling for CNN + Vision-Mamba networks on 3D medical images.

The Python API of the command line, imported on first use so that ``import mambamim`` stays cheap:
``finetune(config)`` (:mod:`mambamim.engine`), ``predict_folder``, ``evaluate_run`` and ``compare_runs``
(:mod:`mambamim.api`). Pre-training is ``mambamim.engine.pretrain_loop.pretrain(config)``: the name
``mambamim.pretrain`` is the pre-trainer subpackage, which a lazy function of that name would collide with.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "finetune": "mambamim.engine.finetune_loop",
    "predict_folder": "mambamim.api",
    "evaluate_run": "mambamim.api",
    "compare_runs": "mambamim.api",
    "reconstruct_file": "mambamim.api",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
