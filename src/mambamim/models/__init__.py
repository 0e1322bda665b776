"""Segmentation networks and their encoders, built by name from the registry (:mod:`mambamim.models.registry`:
one entry per network; adding a model means adding one entry there).

``create_model(name, size="base", **kwargs)``; configurations are data (:data:`MODEL_PRESETS`). Importing
this package imports no torch: the networks (and :func:`load_pretrained_encoder`,
:func:`convert_authors_state`) load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from mambamim.models.registry import (
    MODEL_PRESETS,
    PATCH_SIZE,
    REGISTRY,
    ModelEntry,
    create_encoder,
    create_model,
    get_entry,
    list_models,
    list_sizes,
    model_config,
    pretrainable_models,
)

__all__ = [
    "create_model",
    "create_encoder",
    "load_pretrained_encoder",
    "convert_authors_state",
    "list_models",
    "list_sizes",
    "pretrainable_models",
    "get_entry",
    "model_config",
    "ModelEntry",
    "REGISTRY",
    "MODEL_PRESETS",
    "PATCH_SIZE",
    "HyMamba",
    "HyMambaEncoder",
    "VimUNETR",
    "VimEncoder",
]

_LAZY = {
    "load_pretrained_encoder": "mambamim.models.pretrained",
    "convert_authors_state": "mambamim.models.pretrained",
    "HyMamba": "mambamim.models.hymamba",
    "HyMambaEncoder": "mambamim.models.hymamba",
    "VimUNETR": "mambamim.models.vim_unetr",
    "VimEncoder": "mambamim.models.vim_unetr",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
