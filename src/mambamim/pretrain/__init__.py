"""MambaMIM pre-training: ``create_pretrainer(name, **kwargs)``, or :func:`pretrainer_from_spec` for a saved
``{"name", "kwargs"}`` (:meth:`mambamim.engine.config.PretrainConfig.pretrainer_spec`, the
``pretrainer_spec`` of a pre-training checkpoint)."""

from __future__ import annotations

from typing import Any, Mapping

from mambamim.pretrain.mambamim import PRETRAINABLE, LightDecoder, MambaMIM

__all__ = ["create_pretrainer", "pretrainer_from_spec", "MambaMIM", "LightDecoder", "PRETRAINABLE"]


def create_pretrainer(name: str = "hymamba", **kwargs: Any) -> MambaMIM:
    """Build a MambaMIM pre-trainer for encoder ``name`` (a pre-trainable model of
    :mod:`mambamim.models.registry`: ``hymamba``, ``vim_unetr``, ``mednext_cnn``).

    Keyword arguments: mask_ratio (0.75), token ("toki" or "learnable"), skip (True), bottom_up (True),
    scan ("raster", "zigzag", "hilbert", "shuffle"), size ("base", "small", "tiny"), decoder_width (768 for the
    base size), decoder_norm ("batch"), sparse_full_res (False), sparse_levels (1), and encoder overrides such
    as in_channels. ``pretrainer.encoder`` loads by name into ``create_model(name).encoder``.
    """
    return MambaMIM(name, **kwargs)


def pretrainer_from_spec(spec: Mapping[str, Any]) -> MambaMIM:
    """``create_pretrainer(spec["name"], **spec["kwargs"])``, with a clear ValueError for a malformed spec."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not isinstance(
        spec.get("kwargs", {}), Mapping
    ):
        raise ValueError(f"a pre-trainer spec is {{'name': str, 'kwargs': dict}}, got {spec!r}")
    return create_pretrainer(spec["name"], **dict(spec.get("kwargs", {})))
