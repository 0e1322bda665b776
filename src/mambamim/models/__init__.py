"""Model registry: ``create_model(name, size="base", **kwargs)``; configurations are data."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from mambamim.models.hymamba import HyMamba
from mambamim.models.pretrained import convert_authors_state, load_pretrained_encoder
from mambamim.models.vim_unetr import VimUNETR

__all__ = ["create_model", "load_pretrained_encoder", "convert_authors_state", "list_models", "model_config", "MODEL_REGISTRY", "MODEL_PRESETS"]

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "hymamba": HyMamba,
    "vim_unetr": VimUNETR,
    # HyMamba's CNN stages without the Mamba part: the pure-CNN (SparK) case.
    "mednext_cnn": lambda **kw: HyMamba(**{**kw, "mamba_depth": 0}),
}

AUTHORS: dict[str, Any] = dict(
    norm="layer", widen="conv", skip_norm="layer", skip_bias=True, final_norm=False, bidirectional=False,
    scan="raster", final_channels=32,
)

# Size presets per model; "base" is the paper's configuration, "tiny" is for tests, "mini" for the CPU demo.
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "hymamba": {
        "base": {},
        "tiny": dict(stem_channels=8, widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), expansions=(2, 2, 2, 2),
                     mamba_depth=1),
        # the CPU demo's network: tiny's depths at twice its widths learn the demo's organs in a few hundred
        # iterations where tiny learns two (docs/DEMO.md); about 1.4x tiny's step time
        "mini": dict(stem_channels=16, widths=(16, 32, 48, 96), depths=(1, 1, 1, 1), expansions=(2, 2, 2, 2),
                     mamba_depth=2),
        "small": dict(stem_channels=16, widths=(32, 64, 96, 192), depths=(1, 1, 2, 1), mamba_depth=2),
        # The authors' released network (../shared/authors/): channel LayerNorm in MedNeXt and skip blocks,
        # plain widening convs, one-directional Mamba in raster order, no final norm, a 64->32 last stage.
        "authors": AUTHORS,
    },
    "vim_unetr": {
        "base": {},
        "tiny": dict(dim=48, depth=4, feature_size=8),
        "mini": dict(dim=96, depth=4, feature_size=16),
        "small": dict(dim=384, depth=12, feature_size=16),
    },
    "mednext_cnn": {
        "base": {},
        "tiny": dict(stem_channels=8, widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), expansions=(2, 2, 2, 2)),
        "mini": dict(stem_channels=16, widths=(16, 32, 48, 96), depths=(1, 1, 1, 1), expansions=(2, 2, 2, 2)),
        "small": dict(stem_channels=16, widths=(32, 64, 96, 192), depths=(1, 1, 2, 1)),
    },
}  # fmt: skip


def list_models() -> list[str]:
    return sorted(MODEL_REGISTRY)


def model_config(name: str, size: str = "base", **kwargs: Any) -> dict[str, Any]:
    """The full keyword arguments ``create_model`` would pass for ``name`` / ``size`` / overrides."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    presets = MODEL_PRESETS[name]
    if size not in presets:
        raise ValueError(f"unknown size {size!r} for {name!r}; available: {sorted(presets)}")
    return {**presets[size], **kwargs}


def create_model(name: str, size: str = "base", **kwargs: Any) -> nn.Module:
    """Build a segmentation network by name (``hymamba``, ``vim_unetr``, ``mednext_cnn``).

    Args:
        name: registered model name.
        size: preset (``base`` = paper configuration, ``small``, ``tiny``).
        **kwargs: constructor arguments overriding the preset (in_channels, num_classes, scan, widths, ...).
    """
    config = model_config(name, size, **kwargs)
    return MODEL_REGISTRY[name](**config)
