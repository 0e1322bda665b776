"""MambaMIM pre-training: ``create_pretrainer(name, **kwargs)``, or :func:`pretrainer_from_spec` for a saved
``{"name", "kwargs"}`` (:meth:`mambamim.engine.config.PretrainConfig.pretrainer_spec`, the
``pretrainer_spec`` of a pre-training checkpoint)."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from torch import nn

from mambamim.models.registry import create_encoder
from mambamim.pretrain.mambamim import PRETRAINABLE, LightDecoder, MambaMIM

__all__ = ["create_pretrainer", "pretrainer_from_spec", "encoder_from_spec", "MambaMIM", "LightDecoder", "PRETRAINABLE"]


def create_pretrainer(name: str = "hymamba", **kwargs: Any) -> MambaMIM:
    """Build a MambaMIM pre-trainer for encoder ``name`` (a pre-trainable model of
    :mod:`mambamim.models.registry`: ``hymamba``, ``vim_unetr``, ``mednext_cnn``).

    Keyword arguments: mask_ratio (0.75), token ("toki" or "learnable"), skip (True), bottom_up (True),
    scan ("raster", "zigzag", "hilbert", "shuffle"), size ("base", "small", "tiny"), decoder_width (768 for the
    base size), decoder_norm ("batch"), sparse_full_res (False), sparse_levels (1), and encoder overrides such
    as in_channels. ``pretrainer.encoder`` loads by name into ``create_model(name).encoder``.
    """
    return MambaMIM(name, **kwargs)


def _checked(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not isinstance(
        spec.get("kwargs", {}), Mapping
    ):
        raise ValueError(f"a pre-trainer spec is {{'name': str, 'kwargs': dict}}, got {spec!r}")
    return spec["name"], dict(spec.get("kwargs", {}))


def pretrainer_from_spec(spec: Mapping[str, Any]) -> MambaMIM:
    """``create_pretrainer(spec["name"], **spec["kwargs"])``, with a clear ValueError for a malformed spec."""
    name, kwargs = _checked(spec)
    return create_pretrainer(name, **kwargs)


def encoder_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The encoder ``pretrainer_from_spec(spec)`` would hold (same class, arguments and state-dict keys),
    built without the light decoder."""
    name, kwargs = _checked(spec)
    params = inspect.signature(MambaMIM).parameters
    own = {k for k, p in params.items() if p.kind is not p.VAR_KEYWORD}
    size = kwargs.get("size", params["size"].default)
    scan = kwargs.get("scan", params["scan"].default)
    return create_encoder(name, size, scan=scan, **{k: v for k, v in kwargs.items() if k not in own})
