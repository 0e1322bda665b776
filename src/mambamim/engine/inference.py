"""Networks rebuilt from checkpoints for inference: a fine-tuned segmenter (:func:`load_segmenter`) and a
MambaMIM pre-trainer (:func:`load_pretrainer`). What runs them is :mod:`mambamim.inference`."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from mambamim.runtime.device import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["load_segmenter", "load_pretrainer"]


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


def load_pretrainer(
    checkpoint: str | os.PathLike, device: str | torch.device | None = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a MambaMIM pre-trainer (encoder + light decoder) from a pre-training checkpoint.

    Args:
        checkpoint: ``RUN/checkpoints/last.pt`` (or ``epoch_NNNN.pt``) of ``mambamim pretrain``, or the run
            folder itself.

    Returns:
        ``(pretrainer in eval mode on device, info)``; info has ``config`` (the run's PretrainConfig
        dict), ``preprocessing`` (dict or None), ``crop`` (training crop side), ``mask_ratio``,
        ``step`` and ``path``.

    Raises:
        FileNotFoundError: no such file / no checkpoint in the run folder.
        mambamim.engine.checkpoint.CheckpointError: unreadable, or not a pre-training checkpoint.
    """
    from pathlib import Path

    from mambamim.engine.checkpoint import CheckpointError, load_checkpoint

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
    if fmt != "mambamim-pretrain" or not isinstance(ckpt.get("config"), dict) or "pretrainer" not in ckpt:
        raise CheckpointError(f"{path} is not a mambamim pre-training checkpoint (format={fmt!r})")
    cfg = ckpt["config"]
    pretrainer = _build_pretrainer(cfg)
    state = ckpt["pretrainer"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    pretrainer.load_state_dict(state, strict=True)
    preprocessing = ckpt.get("preprocessing")
    if preprocessing is None:
        preprocessing = _preprocessing_near(path, run_dir, cfg)
    info = {
        "config": cfg,
        "preprocessing": preprocessing,
        "crop": int(cfg.get("crop", 96)),
        "mask_ratio": float(cfg.get("mask_ratio", 0.75)),
        "in_channels": int(cfg.get("in_channels", 1)),
        "step": ckpt.get("step"),
        "path": str(path),
    }
    return pretrainer.to(resolve_device(device)).eval(), info


def _build_pretrainer(cfg: dict[str, Any]) -> nn.Module:
    """The pre-trainer a run's saved configuration describes, built as the training loop builds it."""
    try:
        from mambamim.engine.config import PretrainConfig
        from mambamim.engine.pretrain_loop import _make_pretrainer

        return _make_pretrainer(PretrainConfig.from_dict(dict(cfg)))
    except (ImportError, TypeError, ValueError) as exc:  # an older / foreign config: build from its keys
        logger.debug("building the pre-trainer from raw config keys (%s)", exc)
    from mambamim.engine.config import model_size_kwargs
    from mambamim.pretrain import create_pretrainer

    extra = {} if cfg.get("decoder_width") is None else {"decoder_width": int(cfg["decoder_width"])}
    return create_pretrainer(
        cfg.get("model", "hymamba"),
        in_channels=int(cfg.get("in_channels", 1)),
        mask_ratio=float(cfg.get("mask_ratio", 0.75)),
        token=cfg.get("token", "toki"),
        skip=bool(cfg.get("skip", True)),
        bottom_up=bool(cfg.get("bottom_up", True)),
        scan=cfg.get("scan", "raster"),
        **model_size_kwargs(cfg.get("size", "base")),
        **extra,
    )


def _preprocessing_near(path, run_dir, cfg: dict) -> dict | None:
    """The preprocessing of a pre-training run: its encoder.pt, else the cache it trained on."""
    from pathlib import Path

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
