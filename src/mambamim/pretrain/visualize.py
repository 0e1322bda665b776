"""Paper Fig. 9 for one volume: masked input / reconstruction / original, in three planes.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch).
Volume axes are taken as RAS ``(x, y, z)`` as the cache stores them: ``D = x`` (right-left),
``H = y`` (posterior-anterior), ``W = z`` (inferior-superior). Axial slices fix z, coronal fix
y, sagittal fix x; each is drawn with the second in-plane axis pointing up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mambamim.atomic import atomic_write
from mambamim.pretrain.loss import denormalize_patches

__all__ = ["render_reconstruction"]

logger = logging.getLogger(__name__)

_MASK_COLOUR = "#2b3a5c"  # masked patches: dark blue, distinct from black air


def _to_tensor(x: Tensor | np.ndarray, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x.detach().cpu()


def _volume(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = _to_tensor(x, name)
    if t.dim() == 5:
        if t.shape[0] != 1:
            raise ValueError(f"{name} must hold one volume, got batch {t.shape[0]}")
        t = t[0]
    if t.dim() != 4:
        raise ValueError(f"{name} must be (C, D, H, W) or (1, C, D, H, W), got {tuple(t.shape)}")
    return t.float()


def _slices(vol: np.ndarray, idx: tuple[int, int, int]) -> list[np.ndarray]:
    """vol (D, H, W) -> [axial (H, D), coronal (W, D), sagittal (W, H)] ready for origin='lower'."""
    x, y, z = idx
    return [vol[:, :, z].T, vol[:, y, :].T, vol[x, :, :].T]


def render_reconstruction(
    image: Tensor | np.ndarray,
    reconstruction: Tensor | np.ndarray,
    visible: Tensor | np.ndarray,
    out_png: str | os.PathLike,
    patch_size: int = 16,
    slices: Sequence[int] | None = None,
    title: str | None = None,
    channel: int = 0,
    panel_inches: float = 3.0,
    dpi: int = 100,
) -> Path:
    """Write a 3x3 PNG: columns masked input / reconstruction / original; rows axial / coronal / sagittal.

    Args:
        image: ``(C, D, H, W)`` or ``(1, C, D, H, W)`` input intensities.
        reconstruction: same shape, in per-patch normalised units (the pre-trainer's output);
            it is mapped back with the image's patch statistics, and visible patches are
            pasted from the original.
        visible: ``(d, h, w)`` or ``(1, d, h, w)`` bool bottleneck mask, True = visible,
            ``(d, h, w) = (D, H, W) / patch_size``.
        out_png: output path; written atomically (temp file + ``os.replace``).
        slices: voxel indices ``(x, y, z)`` along ``(D, H, W)``; the sagittal row uses x, the
            coronal y, the axial z. Default: the centre.
        title: optional figure title.
        channel: which channel to show.
        panel_inches, dpi: the PNG is ``3 * panel_inches * dpi`` pixels wide and as high
            (plus ``0.4 * dpi`` with a title).

    Returns:
        the path written.
    """
    img = _volume(image, "image")
    rec = _volume(reconstruction, "reconstruction")
    if img.shape != rec.shape:
        raise ValueError(f"image {tuple(img.shape)} and reconstruction {tuple(rec.shape)} differ in shape")
    C, D, H, W = img.shape
    if not 0 <= channel < C:
        raise ValueError(f"channel {channel} out of range for {C} channels")
    vis = _to_tensor(visible, "visible")
    if vis.dim() == 4 and vis.shape[0] == 1:
        vis = vis[0]
    if vis.dtype != torch.bool:
        raise ValueError(f"visible must be bool, got {vis.dtype}")
    grid = tuple(s // patch_size for s in (D, H, W))
    if any(s % patch_size for s in (D, H, W)) or tuple(vis.shape) != grid:
        raise ValueError(
            f"visible must be (D, H, W) / patch_size = {grid} for a ({D}, {H}, {W}) volume, got {tuple(vis.shape)}"
        )
    if slices is None:
        idx = (D // 2, H // 2, W // 2)
    else:
        idx = tuple(int(i) for i in slices)
        if len(idx) != 3 or not all(0 <= i < s for i, s in zip(idx, (D, H, W))):
            raise ValueError(f"slices must be 3 indices within {(D, H, W)}, got {slices!r}")

    rec_int = denormalize_patches(rec[None], img[None], patch_size)[0]
    vis_vox = vis
    for axis in range(3):
        vis_vox = vis_vox.repeat_interleave(patch_size, dim=axis)
    orig = img[channel].numpy()
    vis_np = vis_vox.numpy()
    pasted = np.where(vis_np, orig, rec_int[channel].numpy())

    lo, hi = np.percentile(orig, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0

    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cmap = colormaps["gray"].with_extremes(bad=_MASK_COLOUR)
    header = 0.4 if title else 0.0
    side = 3 * panel_inches
    fig = Figure(figsize=(side, side + header), dpi=dpi)
    top = side / (side + header)
    axes = fig.subplots(3, 3, gridspec_kw=dict(left=0.06, right=0.995, bottom=0.005, top=top - 0.035,
                                               wspace=0.02, hspace=0.02))
    columns = [
        [np.ma.masked_array(s, ~m) for s, m in zip(_slices(orig, idx), _slices(vis_np, idx))],
        _slices(pasted, idx),
        _slices(orig, idx),
    ]
    col_titles = ["masked input", "reconstruction", "original"]
    row_titles = [f"axial z={idx[2]}", f"coronal y={idx[1]}", f"sagittal x={idx[0]}"]
    for c, planes in enumerate(columns):
        for r, plane in enumerate(planes):
            ax = axes[r, c]
            ax.imshow(plane, cmap=cmap, vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=10)
            if c == 0:
                ax.set_ylabel(row_titles[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.1 / (side + header))

    out = Path(out_png)
    with atomic_write(out) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    logger.debug("wrote %s", out)
    return out
