"""Bottleneck random masks and their nearest upsampling to every encoder stage (SPEC 2.1-2.2).

A *bottleneck mask* is a bool tensor ``(B, d, h, w)`` at the input/16 grid, True = visible.
A *stage mask* is a float 0/1 tensor ``(B, 1, D, H, W)``: the bottleneck mask upsampled by
nearest neighbour, i.e. constant on blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mambamim.ops.block_copy import block_gather, block_scatter

__all__ = [
    "num_visible",
    "random_bottleneck_mask",
    "upsample_mask",
    "stage_masks",
    "validate_mask",
    "gather_visible",
    "scatter_visible",
    "gather_blocks",
    "block_tables",
    "scatter_blocks",
]


def _as_triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3 or any(v <= 0 for v in value):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return value  # type: ignore[return-value]


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Visible tokens per sample: ``round(num_tokens * (1 - mask_ratio))``, at least 1.

    Python's ``round`` (half to even) is used; ``0 <= mask_ratio < 1`` else ValueError.
    """
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return max(1, min(num_tokens, int(round(num_tokens * (1.0 - float(mask_ratio))))))


def random_bottleneck_mask(
    batch: int,
    grid: Sequence[int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random bottleneck mask with the same visible count in every sample.

    Args:
        batch: B.
        grid: ``(d, h, w)`` bottleneck grid (input size / 16).
        mask_ratio: fraction masked, ``0 <= r < 1``.
        generator: makes the mask reproducible; the noise is drawn on the generator's device
            and moved to ``device``.
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        ``(B, d, h, w)`` bool, True = visible, exactly :func:`num_visible` True per sample.
    """
    # A SymInt is the batch size of a compiled model that has seen two batch sizes (dynamic shapes).
    if not isinstance(batch, (int, torch.SymInt)) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    grid = _as_triple(grid, "grid")
    L = grid[0] * grid[1] * grid[2]
    keep = num_visible(L, mask_ratio)
    noise_device = generator.device if generator is not None else (device if device is not None else "cpu")
    # No generator keyword when there is none: with it, torch.rand rejects a symbolic batch size under
    # torch.compile ("SymIntArrayRef expected to contain only concrete integers", torch 2.11-2.13).
    rng = {} if generator is None else {"generator": generator}
    noise = torch.rand(batch, L, device=noise_device, **rng)
    out_device = torch.device(device) if device is not None else noise.device
    keep_idx = noise.argsort(dim=1)[:, :keep].to(out_device)
    mask = torch.zeros(batch, L, dtype=torch.bool, device=out_device)
    mask.scatter_(1, keep_idx, True)
    return mask.view(batch, *grid)


def upsample_mask(
    mask: Tensor, factor_or_size: int | Sequence[int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Nearest upsampling of a bottleneck mask to a finer grid.

    Args:
        mask: ``(B, d, h, w)`` or ``(B, 1, d, h, w)``, bool or 0/1.
        factor_or_size: an int is an isotropic integer factor; a sequence of 3 ints is the
            target size ``(D, H, W)``, each an integer multiple of the mask grid.
        dtype: dtype of the result.

    Returns:
        ``(B, 1, D, H, W)`` of 0/1 in ``dtype``, constant on each ``factor^3`` block.
    """
    if mask.dim() == 5 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 4:
        raise ValueError(f"mask must be (B, d, h, w) or (B, 1, d, h, w), got {tuple(mask.shape)}")
    grid = tuple(mask.shape[1:])
    if isinstance(factor_or_size, int):
        if factor_or_size <= 0:
            raise ValueError(f"upsampling factor must be positive, got {factor_or_size}")
        factors = (factor_or_size,) * 3
    else:
        size = _as_triple(factor_or_size, "size")
        if any(s % g for s, g in zip(size, grid)):
            raise ValueError(f"size {size} is not an integer multiple of the mask grid {grid}")
        factors = tuple(s // g for s, g in zip(size, grid))
    out = mask.to(dtype)
    for axis, f in enumerate(factors, start=1):
        if f > 1:
            out = out.repeat_interleave(f, dim=axis)
    return out.unsqueeze(1)


def stage_masks(
    mask: Tensor, input_size: int | Sequence[int], num_stages: int, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """The mask at each encoder stage grid: full, 1/2, 1/4, ... resolution.

    Args:
        mask: ``(B, d, h, w)`` bool bottleneck mask.
        input_size: ``(D, H, W)`` of the input volume (or one int).
        num_stages: number of grids; stage ``i`` has size ``input_size / 2**i``. With
            ``num_stages=5`` and a 1/16 bottleneck the last entry is the bottleneck grid itself.
        dtype: dtype of the masks.

    Returns:
        list of ``num_stages`` float 0/1 tensors ``(B, 1, D/2**i, H/2**i, W/2**i)``, finest first.
    """
    if not isinstance(num_stages, int) or num_stages <= 0:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    if mask.dim() != 4:
        raise ValueError(f"mask must be (B, d, h, w), got {tuple(mask.shape)}")
    size = _as_triple(input_size, "input_size")
    grid = tuple(mask.shape[1:])
    out = []
    for i in range(num_stages):
        scale = 2**i
        if any(s % scale for s in size):
            raise ValueError(f"input_size {size} is not divisible by 2**{i} (stage {i})")
        stage = tuple(s // scale for s in size)
        if any(s % g for s, g in zip(stage, grid)):
            raise ValueError(f"stage {i} grid {stage} is not an integer multiple of the mask grid {grid}")
        out.append(upsample_mask(mask, stage, dtype))
    return out


def validate_mask(mask: Tensor, grid: Sequence[int]) -> int:
    """Check a bottleneck mask; return the visible count per sample.

    Raises ValueError for: not a tensor, dtype not bool, shape not ``(B, *grid)``, a sample
    with no visible token, or visible counts that differ across the batch. Syncs with the
    device (reads the counts); meant for eager checks, not inside compiled code.
    """
    grid = _as_triple(grid, "grid")
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = visible), got {mask.dtype}")
    if mask.dim() != 4 or tuple(mask.shape[1:]) != grid:
        raise ValueError(f"mask must have shape (B, {grid[0]}, {grid[1]}, {grid[2]}), got {tuple(mask.shape)}")
    if mask.shape[0] == 0:
        raise ValueError("mask has an empty batch")
    counts = mask.flatten(1).sum(dim=1).tolist()
    empty = [i for i, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"samples {empty} have no visible token")
    if len(set(counts)) > 1:
        raise ValueError(f"visible counts differ across the batch: {counts}")
    return int(counts[0])


def _visible_index(visible: Tensor, num_visible: int) -> Tensor:
    # Stable sort puts the visible positions first, in scan order; static shapes, no host sync.
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)
    return order[:, :num_visible]


def gather_visible(tokens: Tensor, visible: Tensor, num_visible: int) -> Tensor:
    """Keep the visible tokens in scan order.

    Args:
        tokens: ``(B, L, C)``; visible: ``(B, L)`` bool with exactly ``num_visible`` True per row
            (not checked here, to avoid a host sync; see ``mambamim.masking.validate_mask``).

    Returns:
        ``(B, num_visible, C)``.
    """
    if tokens.dim() != 3 or visible.shape != tokens.shape[:2]:
        raise ValueError(f"expected tokens (B, L, C) and visible (B, L), got {tuple(tokens.shape)} and {tuple(visible.shape)}")
    index = _visible_index(visible, num_visible)
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_visible(visible_tokens: Tensor, visible: Tensor) -> Tensor:
    """Inverse of :func:`gather_visible`: place ``(B, K, C)`` tokens at the visible positions.

    Args:
        visible_tokens: ``(B, K, C)`` in scan order; visible: ``(B, L)`` bool with K True per row.

    Returns:
        ``(B, L, C)`` with zeros at masked positions.
    """
    if visible_tokens.dim() != 3 or visible.dim() != 2 or visible.shape[0] != visible_tokens.shape[0]:
        raise ValueError(
            f"expected visible_tokens (B, K, C) and visible (B, L), got {tuple(visible_tokens.shape)} "
            f"and {tuple(visible.shape)}"
        )
    B, K, C = visible_tokens.shape
    index = _visible_index(visible, K)
    out = visible_tokens.new_zeros(B, visible.shape[1], C)
    return out.scatter(1, index.unsqueeze(-1).expand(-1, -1, C), visible_tokens)


def block_tables(mask: Tensor, num_visible: int) -> tuple[Tensor, Tensor]:
    """The cell tables of :mod:`mambamim.ops.block_copy` for a bottleneck mask (B, gd, gh, gw) with
    ``num_visible`` True per sample: ``cells`` (B * num_visible,) flat cell indices, sample-major and in
    raster order, and ``lookup`` (B, gd, gh, gw) int32, each visible cell's block index (-1 if masked)."""
    B = mask.shape[0]
    order = _visible_index(mask.flatten(1), num_visible)  # (B, K)
    ids = torch.arange(B * num_visible, device=mask.device, dtype=torch.int32).view(B, num_visible)
    lookup = torch.full((B, mask[0].numel()), -1, device=mask.device, dtype=torch.int32).scatter(1, order, ids)
    return order.reshape(-1), lookup.view(mask.shape)


def gather_blocks(x: Tensor, mask: Tensor, num_visible: int, halo: int = 0) -> Tensor:
    """The visible cells of a volume as a batch of blocks, each with a ``halo`` of its neighbourhood.

    Args:
        x: ``(B, C, D, H, W)``, each side a multiple of the mask grid's (cell side s = D / gd).
        mask: ``(B, gd, gh, gw)`` bool, True = visible, ``num_visible`` True per sample (not checked).
        halo: voxels of context on every side, below the cell side (zeros beyond the volume, x's
            values elsewhere).

    Returns:
        ``(B * num_visible, C, s + 2 halo, ...)``, sample-major, cells in raster order, laid out
        channels-last (what a following convolution wants on GPUs). One Triton kernel on CUDA
        (:func:`mambamim.ops.block_copy.block_gather`).
    """
    cell = _cell_side(x, mask)
    cells, lookup = block_tables(mask, num_visible)
    return block_gather(x, cells, lookup, cell, halo)


def scatter_blocks(
    blocks: Tensor, mask: Tensor, num_visible: int, halo: int = 0, like: Tensor | None = None
) -> Tensor:
    """Place ``(B * num_visible, C, s + 2 halo, ...)`` blocks at the visible cells of a dense volume.

    Without halo this inverts :func:`gather_blocks` (zeros at masked cells). With a halo, every block
    covers its cell plus ``halo`` voxels around it; overlapping parts are summed and what falls outside
    the volume is dropped, which assembles a linear operator's output from per-cell contributions
    (e.g. a "full" convolution of each visible cell alone). It is the adjoint (and gradient) of
    :func:`gather_blocks` with the same halo.

    Returns:
        ``(B, C, gd * s, gh * s, gw * s)``, channels-last 3D in memory when ``like`` is (else contiguous).
    """
    B = mask.shape[0]
    n, side = blocks.shape[0], blocks.shape[2]
    s = side - 2 * halo
    if mask.dim() != 4 or blocks.dim() != 5 or n != B * num_visible or blocks.shape[2:] != (side, side, side) or s < 1:
        raise ValueError(f"expected ({B * num_visible}, C, s + {2 * halo}, ...) cubic blocks, got {tuple(blocks.shape)}")
    cells, lookup = block_tables(mask, num_visible)
    out = block_scatter(blocks, cells, lookup, s, halo)
    channels_last = like is not None and like.is_contiguous(memory_format=torch.channels_last_3d) and not (
        like.is_contiguous())  # fmt: skip
    return out if channels_last else out.contiguous()


def _cell_side(x: Tensor, mask: Tensor) -> int:
    if x.dim() != 5 or mask.dim() != 4 or x.shape[0] != mask.shape[0]:
        raise ValueError(f"expected x (B, C, D, H, W) and mask (B, gd, gh, gw), got {tuple(x.shape)} and {tuple(mask.shape)}")
    cell = x.shape[2] // mask.shape[1]
    if any(s != g * cell for s, g in zip(x.shape[2:], mask.shape[1:])):
        raise ValueError(f"volume {tuple(x.shape[2:])} is not the mask grid {tuple(mask.shape[1:])} times one cell side")
    return cell
