"""Data: synthetic phantoms, NIfTI / DICOM ingestion, preprocessing cache and training loaders.

Kept light on purpose: nothing heavy is imported here. The names below resolve lazily to
their submodules (``mambamim.data.synth``, ``mambamim.data.loaders``) on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "synth_dataset": "synth",
    "make_phantom": "synth",
    "BTCV_LABELS": "synth",
    "build_train_loader": "loaders",
    "build_train_dataset": "loaders",
    "build_eval_dataset": "loaders",
    "infinite_batches": "loaders",
    "split_cases": "loaders",
    "list_case_ids": "loaders",
    "shard_indices": "loaders",
    "read_cache_index": "loaders",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
