"""Paper Fig. 9 for one volume: input / masked input / reconstruction / target, in three planes.

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
from mambamim.models.registry import PATCH_SIZE
from mambamim.pretrain.loss import denormalize_patches

__all__ = ["render_reconstruction"]

logger = logging.getLogger(__name__)

_MASK_COLOUR = "#2b3a5c"  # masked patches: dark blue, distinct from black air
_BAR_INCHES = 1.0  # room for the colour bar and its label right of the panels


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
    patch_size: int = PATCH_SIZE,
    slices: Sequence[int] | None = None,
    title: str | None = None,
    channel: int = 0,
    panel_inches: float = 3.0,
    dpi: int = 100,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write a 3x4 PNG: columns input / masked input / reconstruction / target; rows axial / coronal /
    sagittal, all four columns on one intensity scale with a colour bar.

    The masked input is what the encoder sees (masked patches drawn in a dark blue); the
    reconstruction shows the network's prediction in the masked patches (mapped back to intensities
    with each patch's mean and standard deviation, the loss's normalisation) and the input in the
    visible ones; the target shows the masked patches the loss compares against (visible ones blue).

    Args:
        image: ``(C, D, H, W)`` or ``(1, C, D, H, W)`` input intensities.
        reconstruction: same shape, in per-patch normalised units (the pre-trainer's output).
        visible: ``(d, h, w)`` or ``(1, d, h, w)`` bool bottleneck mask, True = visible,
            ``(d, h, w) = (D, H, W) / patch_size``.
        out_png: output path; written atomically (temp file + ``os.replace``).
        slices: voxel indices ``(x, y, z)`` along ``(D, H, W)``; the sagittal row uses x, the
            coronal y, the axial z. Default: the centre.
        title: optional figure title.
        channel: which channel to show.
        panel_inches, dpi: the PNG is ``(4 * panel_inches + 1) * dpi`` pixels wide and
            ``3 * panel_inches * dpi`` high (plus ``0.4 * dpi`` with a title).
        window: ``(lo, hi)`` Hounsfield units that intensities 0 and 1 stand for (the preprocessing
            window): the colour bar is then labelled in HU; None labels it in normalised intensity.

    Returns:
        the path written.
    """
    img, rec, vis, idx = _check_inputs(image, reconstruction, visible, patch_size, slices, channel)
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
    planes = _slices(vis_np, idx)
    columns = {
        "input": _slices(orig, idx),
        "masked input (encoder sees)": [np.ma.masked_array(s, ~m) for s, m in zip(_slices(orig, idx), planes)],
        "reconstruction": _slices(pasted, idx),
        "target (masked patches)": [np.ma.masked_array(s, m) for s, m in zip(_slices(orig, idx), planes)],
    }
    rows = [f"axial z={idx[2]}", f"coronal y={idx[1]}", f"sagittal x={idx[0]}"]
    fig = _draw(columns, rows, (float(lo), float(hi)), window, title, panel_inches, dpi)
    out = Path(out_png)
    with atomic_write(out) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    logger.debug("wrote %s", out)
    return out


def _check_inputs(image, reconstruction, visible, patch_size: int, slices, channel: int):
    """Validated (image (C, D, H, W), reconstruction, visible (d, h, w) bool, slice indices)."""
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
        return img, rec, vis, (D // 2, H // 2, W // 2)
    idx = tuple(int(i) for i in slices)
    if len(idx) != 3 or not all(0 <= i < s for i, s in zip(idx, (D, H, W))):
        raise ValueError(f"slices must be 3 indices within {(D, H, W)}, got {slices!r}")
    return img, rec, vis, idx


def _draw(columns: dict[str, list], rows: list[str], scale: tuple[float, float], window, title: str | None,
          panel_inches: float, dpi: int):
    """The figure: one column per entry, one row per plane, a shared colour bar on the right."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cmap = colormaps["gray"].with_extremes(bad=_MASK_COLOUR)
    header = 0.4 if title else 0.0
    width, height = 4 * panel_inches + _BAR_INCHES, 3 * panel_inches
    fig = Figure(figsize=(width, height + header), dpi=dpi)
    top = height / (height + header)
    right = 4 * panel_inches / width
    axes = fig.subplots(3, 4, gridspec_kw=dict(left=0.045, right=right, bottom=0.005, top=top - 0.035,
                                               wspace=0.02, hspace=0.02))
    lo, hi = scale
    for c, (name, planes) in enumerate(columns.items()):
        for r, plane in enumerate(planes):
            ax = axes[r, c]
            shown = ax.imshow(plane, cmap=cmap, vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(rows[r], fontsize=9)
    cax = fig.add_axes((right + 0.01, 0.1, 0.012, 0.75))
    bar = fig.colorbar(shown, cax=cax)
    if window is not None:
        hu_lo, hu_hi = window
        ticks = np.linspace(lo, hi, 5)
        bar.set_ticks(ticks)
        bar.set_ticklabels([f"{hu_lo + t * (hu_hi - hu_lo):.0f}" for t in ticks])
        bar.set_label("HU (same scale in every panel)", fontsize=8)
    else:
        bar.set_label("intensity (same scale in every panel)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.1 / (height + header))
    return fig
