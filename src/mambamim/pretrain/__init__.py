"""MambaMIM pre-training: ``create_pretrainer(name, **kwargs)``."""

from __future__ import annotations

from typing import Any

from mambamim.pretrain.mambamim import PRETRAINABLE, LightDecoder, MambaMIM

__all__ = ["create_pretrainer", "MambaMIM", "LightDecoder", "PRETRAINABLE"]


def create_pretrainer(name: str = "hymamba", **kwargs: Any) -> MambaMIM:
    """Build a MambaMIM pre-trainer for encoder ``name`` (``hymamba``, ``vim_unetr``, ``mednext_cnn``).

    Keyword arguments: mask_ratio (0.75), token ("toki" or "learnable"), skip (True), bottom_up (True),
    scan ("raster", "zigzag", "hilbert", "shuffle"), size ("base", "small", "tiny"), decoder_width (768 for the base size),
    decoder_norm ("batch"), and encoder overrides such as in_channels. ``pretrainer.encoder`` loads by
    name into ``create_model(name).encoder``.
    """
    return MambaMIM(name, **kwargs)
