"""Paper Fig. 9 for one image file: mask, reconstruct with a pre-trainer, render."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch
from torch import nn

from mambamim.inference.sliding_window import centre_crop
from mambamim.models.registry import PATCH_SIZE
from mambamim.runtime.device import run_device

__all__ = ["reconstruct_image"]


def reconstruct_image(
    pretrainer: nn.Module,
    info: dict[str, Any],
    image_paths: Sequence[str] | str,
    out_png: str | os.PathLike,
    *,
    mask_ratio: float | None = None,
    seed: int = 0,
    crop: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = True,
) -> dict[str, Any]:
    """Paper Fig. 9 for one image: preprocess, centre-crop to the model's size, mask with a seeded
    random bottleneck mask, reconstruct and render masked input / reconstruction / original.

    Args:
        pretrainer, info: from :func:`load_pretrainer`.
        image_paths: NIfTI file or DICOM series folder (one per channel).
        out_png: the PNG to write (atomically).
        mask_ratio: fraction of bottleneck tokens masked; default the run's.
        seed: seeds the mask, so a figure is reproducible.
        crop: crop side (multiple of :data:`~mambamim.models.registry.PATCH_SIZE`); default the run's training crop.

    Returns:
        ``{"png": path, "loss": float, "visible": int, "tokens": int, "crop": int}``.
    """
    from mambamim.data.preprocess import PreprocessParams, preprocess_image
    from mambamim.masking.masks import random_bottleneck_mask
    from mambamim.pretrain.visualize import render_reconstruction

    ratio = float(info.get("mask_ratio", 0.75) if mask_ratio is None else mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    side = int(crop or info.get("crop", 96))
    if side < PATCH_SIZE or side % PATCH_SIZE:
        raise ValueError(f"crop must be a positive multiple of {PATCH_SIZE}, got {side}")
    paths = [str(image_paths)] if isinstance(image_paths, (str, os.PathLike)) else [str(p) for p in image_paths]
    params = PreprocessParams.from_dict(info.get("preprocessing"))
    image, _ = preprocess_image(paths, params)
    x = centre_crop(torch.from_numpy(image), (side,) * 3)[None]
    dev = run_device(pretrainer, device)
    pretrainer = pretrainer.to(dev).eval()
    x = x.to(dev)
    gen = torch.Generator().manual_seed(int(seed))
    mask = random_bottleneck_mask(1, [side // PATCH_SIZE] * 3, ratio, generator=gen, device=dev)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and dev.type == "cuda") else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out = pretrainer(x, mask=mask)
    png = render_reconstruction(
        x.float().cpu(), out["reconstruction"].float().cpu(), out["mask"].cpu(), out_png,
        title=f"{os.path.basename(paths[0])}: MambaMIM reconstruction, mask ratio {ratio:.2f}, seed {seed}",
        window=(params.hu_min, params.hu_max),
    )
    visible = int(out["mask"].sum().item())
    return {"png": str(png), "loss": float(out["loss"].float().item()), "visible": visible,
            "tokens": int(out["mask"].numel()), "crop": side}
