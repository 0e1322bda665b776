"""Networks rebuilt from checkpoints for inference: a fine-tuned segmenter (:func:`load_segmenter`), a
MambaMIM pre-trainer (:func:`load_pretrainer`) and its encoder (:func:`load_pretrained_encoder`), the last two
from the checkpoint's ``pretrainer_spec`` (no defaults assumed). What runs them is :mod:`mambamim.inference`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mambamim.runtime.device import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["load_segmenter", "load_pretrainer", "load_pretrained_encoder", "pretrainer_spec_of"]


def load_segmenter(
    checkpoint: str | os.PathLike, device: str | torch.device | None = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned network from its checkpoint (file or run folder) for inference.

    Returns:
        ``(model in eval mode on device, info)``; info as in
        :func:`mambamim.engine.checkpoint.model_from_checkpoint` (``class_names``, ``preprocessing``,
        ``roi_size``, ``in_channels``, ...).

    Raises:
        FileNotFoundError: no such checkpoint.
        mambamim.engine.checkpoint.CheckpointError: corrupt, truncated or not a fine-tuning checkpoint.
    """
    from mambamim.engine.checkpoint import model_from_checkpoint

    dev = resolve_device(device)
    model, info = model_from_checkpoint(checkpoint, map_location="cpu")
    return model.to(dev).eval(), info


def pretrainer_spec_of(ckpt: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, Any]:
    """The ``{"name", "kwargs"}`` of the pre-trainer a checkpoint was trained with: its saved
    ``pretrainer_spec``, else (older checkpoints) the one its saved run configuration describes
    (``PretrainConfig.from_dict(ckpt["config"]).pretrainer_spec()``).

    Raises:
        mambamim.engine.checkpoint.CheckpointError: neither is there, or the configuration is invalid.
    """
    from mambamim.engine.checkpoint import CheckpointError
    from mambamim.engine.config import PretrainConfig

    spec = ckpt.get("pretrainer_spec")
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs"), Mapping):
        return {"name": spec["name"], "kwargs": dict(spec["kwargs"])}
    cfg = ckpt.get("config")
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{path} records neither a pretrainer_spec nor a pre-training configuration")
    try:
        return PretrainConfig.from_dict(dict(cfg)).pretrainer_spec()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its saved configuration does not describe a pre-trainer ({exc})") from exc


def load_pretrainer(
    checkpoint: str | os.PathLike, device: str | torch.device | None = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a MambaMIM pre-trainer (encoder + light decoder) exactly as it was trained, from a
    pre-training checkpoint: built from the checkpoint's ``pretrainer_spec`` (or, for older checkpoints,
    from its saved configuration; :func:`pretrainer_spec_of`), weights loaded strictly.

    Args:
        checkpoint: ``RUN/checkpoints/last.pt`` (or ``epoch_NNNN.pt``) of ``mambamim pretrain``, or the run
            folder itself. (``encoder.pt`` holds no decoder: use :func:`load_pretrained_encoder`.)

    Returns:
        ``(pretrainer in eval mode on device, info)``; info has ``spec`` (``{"name", "kwargs"}``), ``config``
        (the run's PretrainConfig dict, {} if not saved), ``preprocessing`` (dict or None), ``crop`` (training
        crop side), ``mask_ratio``, ``in_channels``, ``step`` and ``path``.

    Raises:
        FileNotFoundError: no such file / no checkpoint in the run folder.
        mambamim.engine.checkpoint.CheckpointError: unreadable, or not a pre-training checkpoint.
    """
    from mambamim.engine.checkpoint import CheckpointError, load_checkpoint, strip_prefix
    from mambamim.models.registry import get_entry
    from mambamim.pretrain import pretrainer_from_spec

    path = Path(checkpoint)
    run_dir = None
    if path.is_dir():
        run_dir = path
        path = path / "checkpoints" / "last.pt"
        if not path.exists():
            raise FileNotFoundError(f"no checkpoints/last.pt in pre-training run folder {run_dir}")
    ckpt = load_checkpoint(path)
    fmt = ckpt.get("format")
    if fmt == "mambamim-encoder":
        raise CheckpointError(
            f"{path} holds only the pre-trained encoder; the reconstruction needs the decoder too: "
            "give the run's checkpoints/last.pt"
        )
    if fmt != "mambamim-pretrain" or "pretrainer" not in ckpt:
        raise CheckpointError(f"{path} is not a mambamim pre-training checkpoint (format={fmt!r})")
    spec = pretrainer_spec_of(ckpt, path)
    cfg = dict(ckpt["config"]) if isinstance(ckpt.get("config"), Mapping) else {}
    try:
        pretrainer = pretrainer_from_spec(spec)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild its pre-trainer from {spec} ({exc})") from exc
    pretrainer.load_state_dict(strip_prefix(ckpt["pretrainer"]), strict=True)
    preprocessing = ckpt.get("preprocessing")
    if preprocessing is None:
        preprocessing = _preprocessing_near(path, run_dir, cfg)
    info = {
        "spec": spec,
        "config": cfg,
        "preprocessing": preprocessing,
        "crop": int(cfg.get("crop", get_entry(spec["name"]).default_crop)),
        "mask_ratio": float(pretrainer.mask_ratio),
        "in_channels": int(pretrainer.in_channels),
        "step": ckpt.get("step"),
        "path": str(path),
    }
    return pretrainer.to(resolve_device(device)).eval(), info


def load_pretrained_encoder(checkpoint: str | os.PathLike, device: str | torch.device | None = "cpu") -> nn.Module:
    """The pre-trained encoder, rebuilt exactly as it was trained and with its weights (strict), in eval mode.

    Args:
        checkpoint: ``encoder.pt``, a pre-training ``last.pt`` / ``epoch_NNNN.pt``, or a pre-training run folder
            (its ``encoder.pt``, else ``checkpoints/last.pt``). Checkpoints without a pre-trainer spec or
            configuration (fine-tuning checkpoints, ``mambamim convert`` output) are read by
            :func:`mambamim.models.pretrained.load_pretrained_encoder`.
        device: where the module goes (``auto``: CUDA when available).

    Returns:
        the encoder: on a dense batch x (B, C, D, H, W) it returns the maps the segmentation decoder consumes,
        finest first (HyMamba: L0..L3 and the 1/16 map).

    Raises:
        FileNotFoundError: no such file / nothing to load in the run folder.
        mambamim.engine.checkpoint.CheckpointError: unreadable, or its weights do not fit the encoder it describes.
    """
    from mambamim.engine.checkpoint import CheckpointError, extract_encoder_state, load_checkpoint
    from mambamim.models.pretrained import load_pretrained_encoder as load_by_model_name
    from mambamim.pretrain import encoder_from_spec

    path = Path(checkpoint)
    if path.is_dir():
        candidates = (path / "encoder.pt", path / "checkpoints" / "last.pt")
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no encoder.pt or checkpoints/last.pt in {checkpoint}")
    ckpt = load_checkpoint(path)
    if not (isinstance(ckpt.get("pretrainer_spec"), Mapping) or isinstance(ckpt.get("config"), Mapping)):
        try:
            encoder = load_by_model_name(path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        return encoder.to(resolve_device(device))
    spec = pretrainer_spec_of(ckpt, path)
    if isinstance(ckpt.get("encoder"), Mapping):
        weights = dict(ckpt["encoder"])
    elif isinstance(ckpt.get("pretrainer"), Mapping):
        weights = extract_encoder_state(ckpt["pretrainer"])[0]
    else:
        raise CheckpointError(f"{path} holds no encoder weights")
    try:
        encoder = encoder_from_spec(spec)
        encoder.load_state_dict(weights, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its encoder weights do not fit the encoder of {spec} ({exc})") from exc
    return encoder.to(resolve_device(device)).eval()


def _preprocessing_near(path, run_dir, cfg: dict) -> dict | None:
    """The preprocessing of a pre-training run: its encoder.pt, else the cache it trained on."""
    from mambamim.engine.checkpoint import load_checkpoint

    run = run_dir or Path(path).resolve().parent.parent
    enc = Path(run) / "encoder.pt"
    if enc.is_file():
        try:
            pre = load_checkpoint(enc).get("preprocessing")
            if pre:
                return pre
        except Exception as exc:  # fall through to the cache
            logger.debug("cannot read %s: %s", enc, exc)
    from mambamim.engine.config import find_cache, read_cache_meta

    for candidate in (cfg.get("data"), str(Path(run) / "cache")):
        if candidate and os.path.exists(candidate):
            cache = find_cache(candidate)
            if cache is not None:
                return read_cache_meta(cache).get("preprocessing")
    logger.warning("no preprocessing recorded for %s: using the defaults", path)
    return None
