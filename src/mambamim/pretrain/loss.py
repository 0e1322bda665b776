"""MambaMIM reconstruction loss (SPEC 2.8): MSE to the per-patch normalised input, masked patches only.

Patch layout: a volume ``(B, C, D, H, W)`` with patch size ``p`` becomes ``(B, L, C, p**3)``
with ``L = (D/p) * (H/p) * (W/p)`` in raster order of the ``(d, h, w)`` patch grid, the same
order as ``mask.flatten(1)`` for a bottleneck mask ``(B, d, h, w)``.

Per-patch normalisation follows SparK / MAE: for each patch and channel,
``(x - mean) / sqrt(var + eps)`` with the unbiased variance (``torch.var`` default).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mambamim.models.registry import PATCH_SIZE

__all__ = ["patchify", "unpatchify", "patch_normalize", "denormalize_patches", "masked_patch_mse"]


def _check_volume(x: Tensor, patch_size: int, name: str) -> tuple[int, int, int]:
    if not isinstance(patch_size, int) or patch_size < 2:
        raise ValueError(f"patch_size must be an int >= 2, got {patch_size!r}")
    if x.dim() != 5:
        raise ValueError(f"{name} must be (B, C, D, H, W), got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if any(s % patch_size for s in spatial):
        raise ValueError(f"{name} spatial size {spatial} is not divisible by patch_size {patch_size}")
    return spatial[0] // patch_size, spatial[1] // patch_size, spatial[2] // patch_size  # type: ignore[return-value]


def patchify(x: Tensor, patch_size: int = PATCH_SIZE) -> Tensor:
    """``(B, C, D, H, W)`` -> ``(B, L, C, p**3)``, patches in raster order of the patch grid."""
    d, h, w = _check_volume(x, patch_size, "x")
    B, C = x.shape[:2]
    p = patch_size
    x = x.reshape(B, C, d, p, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, d * h * w, C, p**3)


def unpatchify(patches: Tensor, grid: tuple[int, int, int], patch_size: int = PATCH_SIZE) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, L, C, p**3)`` with ``L = d*h*w`` -> ``(B, C, d*p, h*p, w*p)``."""
    d, h, w = grid
    p = patch_size
    if patches.dim() != 4 or patches.shape[1] != d * h * w or patches.shape[3] != p**3:
        raise ValueError(f"patches must be (B, {d * h * w}, C, {p**3}), got {tuple(patches.shape)}")
    B, _, C, _ = patches.shape
    x = patches.reshape(B, d, h, w, C, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, C, d * p, h * p, w * p)


def _at_least_fp32(x: Tensor) -> Tensor:
    # bf16 / fp16 (autocast outputs) go up to float32; float64 stays float64 (parity tests run in it)
    return x if x.dtype == torch.float64 else x.float()


# The patch statistics work on a (B, C, d, p, h, p, w, p) view, each patch's voxels on dims 3, 5 and 7:
# reductions over those dims need no permuted copy. With the patchify form (an 8-D permute), the compiled
# GPU step's profile had 0.6-1.5 ms kernels fusing clone / div / expand over the reconstruction and its
# gradient, where one pass over a 1-channel batch takes about 0.02 ms (not re-measured since this change).
_IN_PATCH = (3, 5, 7)


def _blocks(x: Tensor, patch_size: int) -> Tensor:
    B, C, D, H, W = x.shape
    p = patch_size
    return x.reshape(B, C, D // p, p, H // p, p, W // p, p)


def _patch_stats(target: Tensor, patch_size: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    t = _blocks(_at_least_fp32(target), patch_size)
    var, mean = torch.var_mean(t, dim=_IN_PATCH, keepdim=True)  # unbiased, as torch.var
    return t, mean, (var + eps).sqrt()


def patch_normalize(target: Tensor, patch_size: int = PATCH_SIZE, eps: float = 1e-6) -> Tensor:
    """The regression target: ``(B, C, D, H, W)`` normalised per patch and channel (float32, or float64 for float64 input)."""
    _check_volume(target, patch_size, "target")
    t, mean, std = _patch_stats(target, patch_size, eps)
    return ((t - mean) / std).reshape(target.shape)


def denormalize_patches(pred: Tensor, target: Tensor, patch_size: int = PATCH_SIZE, eps: float = 1e-6) -> Tensor:
    """Map a prediction in per-patch normalised units back to intensities (for visualisation).

    Args:
        pred, target: ``(B, C, D, H, W)``; the target's patch mean / std are used.

    Returns:
        ``(B, C, D, H, W)`` float32 (float64 for float64 inputs): ``pred * std_patch + mean_patch``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    _check_volume(target, patch_size, "target")
    _, mean, std = _patch_stats(target, patch_size, eps)
    return (_blocks(_at_least_fp32(pred), patch_size) * std + mean).reshape(pred.shape)


def masked_patch_mse(
    reconstruction: Tensor, target: Tensor, visible: Tensor, patch_size: int = PATCH_SIZE, eps: float = 1e-6
) -> Tensor:
    """MSE between the reconstruction and the per-patch normalised target, over masked patches.

    Args:
        reconstruction: ``(B, C, D, H, W)`` in per-patch normalised units.
        target: ``(B, C, D, H, W)`` input intensities.
        visible: ``(B, D/p, H/p, W/p)`` bool, True = visible (those patches are ignored).

    Returns:
        scalar float32 (float64 when both inputs are float64): the per-patch MSE (mean over channels and voxels) averaged over the
        masked patches of the batch; 0 if no patch is masked. The reconstruction at visible
        patches gets zero gradient.
    """
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    grid = _check_volume(target, patch_size, "target")
    B = target.shape[0]
    if visible.dtype != torch.bool or tuple(visible.shape) != (B, *grid):
        raise ValueError(
            f"visible must be bool (B, d, h, w) = {(B, *grid)}, got {visible.dtype} {tuple(visible.shape)}"
        )
    t, mean, std = _patch_stats(target, patch_size, eps)
    rec = _blocks(_at_least_fp32(reconstruction), patch_size)
    masked = ~visible  # (B, d, h, w)
    # where, not multiply: a non-finite value at a visible patch must not reach the loss
    err = torch.where(masked[:, None, :, None, :, None, :, None], rec - (t - mean) / std, 0.0)
    per_patch = err.square().mean(dim=(1, *_IN_PATCH))  # (B, d, h, w): over channels and voxels
    return per_patch.sum() / masked.sum().clamp_min(1)
