"""Scan orders that serialize a 3D token grid into the Mamba sequence (paper Table 10).

An order is a permutation ``perm`` of the flattened (row-major, ``d * H * W + h * W + w``) grid:
``sequence[i] = grid_flat[perm[i]]``; ``inverse_permutation(perm)`` undoes it. The order also defines
what TOKI treats as "adjacent" tokens.

- ``raster``: row-major.
- ``zigzag``: boustrophedon; every other row and every other slice reversed so that consecutive
  tokens are always face neighbours.
- ``hilbert``: a generalized 3D Hilbert curve that works on any cuboid (6x6x6, 4x6x8, ...), not just
  powers of two; consecutive tokens are face neighbours whenever the sides are even (odd sides can
  force an occasional diagonal step, as for every curve of this kind).
- ``shuffle``: a random permutation; :class:`ScanOrder` draws a fresh one at every training forward
  and uses a fixed one (seeded by the grid) at evaluation.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

SCAN_ORDERS = ("raster", "zigzag", "hilbert", "shuffle")

__all__ = ["SCAN_ORDERS", "scan_permutation", "inverse_permutation", "ScanOrder"]


def _flat(coords: list[tuple[int, int, int]], grid: tuple[int, int, int]) -> torch.Tensor:
    _, h, w = grid
    return torch.tensor([d * h * w + y * w + x for d, y, x in coords], dtype=torch.long)


def _zigzag(grid: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    depth, height, width = grid
    coords = []
    row = 0
    for d in range(depth):
        ys = range(height) if d % 2 == 0 else range(height - 1, -1, -1)
        for y in ys:
            xs = range(width) if row % 2 == 0 else range(width - 1, -1, -1)
            coords.extend((d, y, x) for x in xs)
            row += 1
    return coords


def _sgn(v: int) -> int:
    return (v > 0) - (v < 0)


def _gilbert3d(
    x: int, y: int, z: int, ax: int, ay: int, az: int, bx: int, by: int, bz: int, cx: int, cy: int, cz: int
) -> Iterator[tuple[int, int, int]]:
    """Generalized Hilbert curve over the cuboid spanned by the major axis a and the minor axes b, c."""
    w, h, d = abs(ax + ay + az), abs(bx + by + bz), abs(cx + cy + cz)
    dax, day, daz = _sgn(ax), _sgn(ay), _sgn(az)
    dbx, dby, dbz = _sgn(bx), _sgn(by), _sgn(bz)
    dcx, dcy, dcz = _sgn(cx), _sgn(cy), _sgn(cz)

    # Degenerate boxes are straight lines.
    if h == 1 and d == 1:
        for i in range(w):
            yield x + i * dax, y + i * day, z + i * daz
        return
    if w == 1 and d == 1:
        for i in range(h):
            yield x + i * dbx, y + i * dby, z + i * dbz
        return
    if w == 1 and h == 1:
        for i in range(d):
            yield x + i * dcx, y + i * dcy, z + i * dcz
        return

    ax2, ay2, az2 = ax // 2, ay // 2, az // 2
    bx2, by2, bz2 = bx // 2, by // 2, bz // 2
    cx2, cy2, cz2 = cx // 2, cy // 2, cz // 2
    w2, h2, d2 = abs(ax2 + ay2 + az2), abs(bx2 + by2 + bz2), abs(cx2 + cy2 + cz2)

    # Even halves keep the sub-curves' entry and exit corners adjacent.
    if w2 % 2 and w > 2:
        ax2, ay2, az2 = ax2 + dax, ay2 + day, az2 + daz
    if h2 % 2 and h > 2:
        bx2, by2, bz2 = bx2 + dbx, by2 + dby, bz2 + dbz
    if d2 % 2 and d > 2:
        cx2, cy2, cz2 = cx2 + dcx, cy2 + dcy, cz2 + dcz

    if 2 * w > 3 * h and 2 * w > 3 * d:
        # Long along a: split a only.
        yield from _gilbert3d(x, y, z, ax2, ay2, az2, bx, by, bz, cx, cy, cz)
        yield from _gilbert3d(x + ax2, y + ay2, z + az2, ax - ax2, ay - ay2, az - az2, bx, by, bz, cx, cy, cz)
    elif 3 * h > 4 * d:
        # Flat in c: split a and b.
        yield from _gilbert3d(x, y, z, bx2, by2, bz2, cx, cy, cz, ax2, ay2, az2)
        yield from _gilbert3d(x + bx2, y + by2, z + bz2, ax, ay, az, bx - bx2, by - by2, bz - bz2, cx, cy, cz)
        yield from _gilbert3d(
            x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby), z + (az - daz) + (bz2 - dbz),
            -bx2, -by2, -bz2, cx, cy, cz, -(ax - ax2), -(ay - ay2), -(az - az2),
        )  # fmt: skip
    elif 3 * d > 4 * h:
        # Flat in b: split a and c.
        yield from _gilbert3d(x, y, z, cx2, cy2, cz2, ax2, ay2, az2, bx, by, bz)
        yield from _gilbert3d(x + cx2, y + cy2, z + cz2, ax, ay, az, bx, by, bz, cx - cx2, cy - cy2, cz - cz2)
        yield from _gilbert3d(
            x + (ax - dax) + (cx2 - dcx), y + (ay - day) + (cy2 - dcy), z + (az - daz) + (cz2 - dcz),
            -cx2, -cy2, -cz2, -(ax - ax2), -(ay - ay2), -(az - az2), bx, by, bz,
        )  # fmt: skip
    else:
        # Regular case: split all three axes, five sub-cuboids.
        yield from _gilbert3d(x, y, z, bx2, by2, bz2, cx2, cy2, cz2, ax2, ay2, az2)
        yield from _gilbert3d(x + bx2, y + by2, z + bz2, cx, cy, cz, ax2, ay2, az2, bx - bx2, by - by2, bz - bz2)
        yield from _gilbert3d(
            x + (bx2 - dbx) + (cx - dcx), y + (by2 - dby) + (cy - dcy), z + (bz2 - dbz) + (cz - dcz),
            ax, ay, az, -bx2, -by2, -bz2, -(cx - cx2), -(cy - cy2), -(cz - cz2),
        )  # fmt: skip
        yield from _gilbert3d(
            x + (ax - dax) + bx2 + (cx - dcx), y + (ay - day) + by2 + (cy - dcy), z + (az - daz) + bz2 + (cz - dcz),
            -cx, -cy, -cz, -(ax - ax2), -(ay - ay2), -(az - az2), bx - bx2, by - by2, bz - bz2,
        )  # fmt: skip
        yield from _gilbert3d(
            x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby), z + (az - daz) + (bz2 - dbz),
            -bx2, -by2, -bz2, cx2, cy2, cz2, -(ax - ax2), -(ay - ay2), -(az - az2),
        )  # fmt: skip


def _hilbert(grid: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    depth, height, width = grid
    # The curve runs with x = width axis, y = height axis, z = depth axis; start along the longest side.
    if width >= height and width >= depth:
        pts = _gilbert3d(0, 0, 0, width, 0, 0, 0, height, 0, 0, 0, depth)
    elif height >= width and height >= depth:
        pts = _gilbert3d(0, 0, 0, 0, height, 0, width, 0, 0, 0, 0, depth)
    else:
        pts = _gilbert3d(0, 0, 0, 0, 0, depth, width, 0, 0, 0, height, 0)
    return [(z, y, x) for x, y, z in pts]


def _static_permutation(order: str, grid: tuple[int, int, int]) -> torch.Tensor:
    if order == "raster":
        return torch.arange(grid[0] * grid[1] * grid[2])
    if order == "zigzag":
        return _flat(_zigzag(grid), grid)
    if order == "hilbert":
        return _flat(_hilbert(grid), grid)
    if order == "shuffle":
        g = torch.Generator().manual_seed(hash(grid) % (2**31))
        return torch.randperm(grid[0] * grid[1] * grid[2], generator=g)
    raise ValueError(f"unknown scan order {order!r}; choose one of {SCAN_ORDERS}")


def scan_permutation(
    order: str, grid: tuple[int, int, int], generator: torch.Generator | None = None, random: bool = False
) -> torch.Tensor:
    """Permutation (L,) long, CPU, with ``sequence[i] = grid_flat[perm[i]]``.

    Args:
        order: one of ``raster``, ``zigzag``, ``hilbert``, ``shuffle``.
        grid: (D, H, W) token grid.
        generator: random source for ``shuffle`` when ``random`` is True.
        random: for ``shuffle`` only, draw a fresh permutation instead of the fixed evaluation one.
    """
    grid = tuple(int(s) for s in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive sizes, got {grid}")
    if order == "shuffle" and random:
        return torch.randperm(grid[0] * grid[1] * grid[2], generator=generator)
    return _static_permutation(order, grid)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of a permutation: ``grid_flat = sequence[inverse]``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class _Permute(torch.autograd.Function):
    """``x[:, perm]`` for a permutation ``perm`` of dim 1, whose gradient is ``grad[:, inverse]``: a gather.
    Plain indexing's gradient is a scatter-add (``index_put`` with accumulate), which eagerly on CUDA sorts
    its indices and took 9-34 ms per step for two 8x216x384 tensors (benchmarks/RESULTS.md, rooflines).
    The inverse is made in the backward pass only: a forward without gradients does no extra work."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(perm)
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (perm,) = ctx.saved_tensors
        return grad.index_select(1, inverse_permutation(perm)), None


@torch.compiler.assume_constant_result
def _permutation_values(order: str, grid: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(scan_permutation(order, grid).tolist())


def _permutation_in_graph(order: str, grid: tuple, device: torch.device | None) -> torch.Tensor:
    """The static permutation inside torch.compile'd code. With static sizes its values are computed once,
    at trace time, and become a device constant of the graph: no host work or host-to-device copy per
    call, and no cache whose filling would fail Dynamo's guards and recompile the model at its second
    call. Symbolic sizes (dynamic shapes) are traced as ordinary code."""
    if all(type(g) is int for g in grid):
        return torch.tensor(_permutation_values(order, tuple(grid)), dtype=torch.long, device=device)
    perm = scan_permutation(order, grid)
    return perm.to(device) if device is not None else perm


class ScanOrder(nn.Module):
    """Serializes (B, C, D, H, W) grids into (B, L, C) sequences and back.

    For ``shuffle`` a fresh permutation is drawn at every call of :meth:`permutation` in training mode
    (from the global torch RNG, so ``torch.manual_seed`` makes it reproducible).
    """

    def __init__(self, order: str = "raster") -> None:
        super().__init__()
        if order not in SCAN_ORDERS:
            raise ValueError(f"unknown scan order {order!r}; choose one of {SCAN_ORDERS}")
        self.order = order
        # Per-instance cache of the fixed permutation for the last grid / device seen.
        self._cache: dict[tuple, torch.Tensor] = {}

    def permutation(self, grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
        if self.order == "shuffle" and self.training:
            perm = scan_permutation(self.order, grid, random=True)
            return perm.to(device) if device is not None else perm
        if torch.compiler.is_compiling():
            return _permutation_in_graph(self.order, grid, device)
        key = (tuple(int(g) for g in grid), device)
        if key not in self._cache:
            perm = scan_permutation(self.order, grid)
            self._cache = {key: perm.to(device) if device is not None else perm}
        return self._cache[key]

    @staticmethod
    def serialize(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, L, C) in scan order."""
        return _Permute.apply(x.flatten(2).transpose(1, 2), perm)

    @staticmethod
    def deserialize(seq: torch.Tensor, perm: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, C) in scan order -> (B, C, D, H, W)."""
        flat = _Permute.apply(seq, inverse_permutation(perm))
        return flat.transpose(1, 2).reshape(seq.shape[0], seq.shape[2], *grid)

    def extra_repr(self) -> str:
        return f"order={self.order!r}"
