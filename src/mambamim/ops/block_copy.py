"""Copies between a volume and the batch of its visible cells: the data movement of the sparse
full-resolution path (:func:`mambamim.masking.gather_blocks` / :func:`mambamim.masking.scatter_blocks`).

- :func:`block_gather`: every listed cell of ``x`` as a ``(s + 2 halo)^3`` block, with ``halo`` voxels of
  context on every side (zeros beyond the volume).
- :func:`block_scatter`: the adjoint. Each output voxel is the sum of the block windows that cover it
  (its own cell's, and with a halo its neighbours'); window parts outside the volume are dropped. With
  no halo this inverts the gather (zeros at unlisted cells).

Each is the other's gradient. On CUDA (with Triton) both run one Triton kernel that reads and writes
every element once, on channels-last data; elsewhere, and as the reference, plain advanced indexing.
ATen's advanced indexing costs several strided copies per call on a GPU and its accumulating backward
sorts every index; torch.compile cannot fuse it either (Inductor's index simplification of the gather
chain ran for minutes on CUDA). As custom ops (``torch.ops.mambamim.block_gather`` /
``block_scatter``) both are single opaque calls inside compiled graphs.

The cell tables (built by :mod:`mambamim.masking`):
    cells: (N,) int64, the flat cell index (raster order in the (gd, gh, gw) grid) of block n; blocks
        are sample-major, N / B per sample.
    lookup: (B, gd, gh, gw) int32, the block index of every cell, -1 where there is none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambamim.ops._triton import HAS_TRITON as _HAS_TRITON
from mambamim.ops._triton import tl, triton

__all__ = ["block_gather", "block_scatter", "block_gather_ref", "block_scatter_ref"]

_CL = torch.channels_last_3d


def _check_tables(cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> None:
    if cells.dim() != 1 or lookup.dim() != 4:
        raise ValueError(f"need cells (N,) and lookup (B, gd, gh, gw), got {tuple(cells.shape)} and {tuple(lookup.shape)}")
    if cells.shape[0] % lookup.shape[0]:
        raise ValueError(f"{cells.shape[0]} blocks do not split evenly over {lookup.shape[0]} samples")
    if cell < 1 or not 0 <= halo < cell:
        raise ValueError(f"need a cell side >= 1 and 0 <= halo < cell side, got cell {cell}, halo {halo}")


def _block_index(cells: torch.Tensor, lookup: torch.Tensor, cell: int, side: int) -> tuple[torch.Tensor, ...]:
    """Broadcastable (b, d, h, w) indices of every block's window in the volume padded by the halo (the
    window of a cell starts at its corner there)."""
    B, _, gh, gw = lookup.shape
    k = cells.shape[0] // B
    b = torch.arange(B, device=cells.device).repeat_interleave(k)
    r = torch.arange(side, device=cells.device)
    d = (cells // (gh * gw)) * cell
    h = ((cells // gw) % gh) * cell
    w = (cells % gw) * cell
    return (b.view(-1, 1, 1, 1), (d.view(-1, 1) + r).view(-1, side, 1, 1), (h.view(-1, 1) + r).view(-1, 1, side, 1),
            (w.view(-1, 1) + r).view(-1, 1, 1, side))  # fmt: skip


def block_gather_ref(x: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> torch.Tensor:
    """Reference of :func:`block_gather`: advanced indexing into the padded volume."""
    side = cell + 2 * halo
    xp = F.pad(x, (halo,) * 6) if halo else x
    idx = _block_index(cells, lookup, cell, side)
    return xp.permute(0, 2, 3, 4, 1)[idx].permute(0, 4, 1, 2, 3)


def block_scatter_ref(blocks: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> torch.Tensor:
    """Reference of :func:`block_scatter`: an (accumulating, with a halo) index_put into the padded volume."""
    B, gd, gh, gw = lookup.shape
    side = cell + 2 * halo
    idx = _block_index(cells, lookup, cell, side)
    shape = (B, gd * cell + 2 * halo, gh * cell + 2 * halo, gw * cell + 2 * halo, blocks.shape[1])
    out = blocks.new_zeros(shape).index_put(idx, blocks.permute(0, 2, 3, 4, 1), accumulate=halo > 0)
    if halo:
        out = out[:, halo:-halo, halo:-halo, halo:-halo]
    return out.permute(0, 4, 1, 2, 3)


if _HAS_TRITON:

    @triton.jit
    def _gather_kernel(x_ptr, cells_ptr, out_ptr, K, D, H, W, C, gh, gw, sB, sC, sD, sH, sW,
                       CELL: tl.constexpr, HALO: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr):  # fmt: skip
        # Grid: (N, cdiv(side^3, BV), cdiv(C, BC)). Block n's voxels v of its window, channels c.
        SIDE: tl.constexpr = CELL + 2 * HALO
        n = tl.program_id(0)
        v = tl.program_id(1) * BV + tl.arange(0, BV)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        b = n // K
        cid = tl.load(cells_ptr + n)
        z = (cid // (gh * gw)) * CELL + v // (SIDE * SIDE) - HALO
        y = ((cid // gw) % gh) * CELL + (v // SIDE) % SIDE - HALO
        x = (cid % gw) * CELL + v % SIDE - HALO
        vm = v < SIDE * SIDE * SIDE
        inside = vm & (z >= 0) & (z < D) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        cm = c < C
        src = b.to(tl.int64) * sB + z.to(tl.int64) * sD + y.to(tl.int64) * sH + x.to(tl.int64) * sW
        val = tl.load(x_ptr + src[:, None] + c[None, :].to(tl.int64) * sC, mask=inside[:, None] & cm[None, :], other=0.0)
        dst = (n.to(tl.int64) * (SIDE * SIDE * SIDE) + v.to(tl.int64)) * C
        tl.store(out_ptr + dst[:, None] + c[None, :], val, mask=vm[:, None] & cm[None, :])

    @triton.jit
    def _scatter_kernel(blocks_ptr, lookup_ptr, out_ptr, gd, gh, gw, C,
                        CELL: tl.constexpr, HALO: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr):  # fmt: skip
        # Grid: (B * gd * gh * gw, cdiv(CELL^3, BV), cdiv(C, BC)). Voxels v of output cell q, channels c;
        # each sums the windows covering it: its own cell's and, with a halo (< CELL), the 26 neighbours'.
        # A neighbour's block index is one scalar load per program, and an absent neighbour (a masked cell,
        # or beyond the grid) is skipped by the whole program: masked cells only write their zeros.
        SIDE: tl.constexpr = CELL + 2 * HALO
        R: tl.constexpr = 1 if HALO > 0 else 0
        q = tl.program_id(0)
        v = tl.program_id(1) * BV + tl.arange(0, BV)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        b = q // (gd * gh * gw)
        cz = (q // (gh * gw)) % gd
        cy = (q // gw) % gh
        cx = q % gw
        lz = v // (CELL * CELL)
        ly = (v // CELL) % CELL
        lx = v % CELL
        vm = v < CELL * CELL * CELL
        cm = c < C
        acc = tl.zeros((BV, BC), dtype=tl.float32)
        for oz in tl.static_range(-R, R + 1):
            for oy in tl.static_range(-R, R + 1):
                for ox in tl.static_range(-R, R + 1):
                    nz, ny, nx = cz + oz, cy + oy, cx + ox
                    in_grid = (nz >= 0) & (nz < gd) & (ny >= 0) & (ny < gh) & (nx >= 0) & (nx < gw)
                    blk = tl.load(lookup_ptr + ((b * gd + nz) * gh + ny) * gw + nx, mask=in_grid, other=-1)
                    if blk >= 0:
                        wz = lz - oz * CELL + HALO
                        wy = ly - oy * CELL + HALO
                        wx = lx - ox * CELL + HALO
                        ok = vm & (wz >= 0) & (wz < SIDE) & (wy >= 0) & (wy < SIDE) & (wx >= 0) & (wx < SIDE)
                        src = (blk.to(tl.int64) * (SIDE * SIDE * SIDE) + (wz * SIDE + wy) * SIDE + wx) * C
                        acc += tl.load(blocks_ptr + src[:, None] + c[None, :], mask=ok[:, None] & cm[None, :],
                                       other=0.0).to(tl.float32)  # fmt: skip
        z = (cz * CELL + lz).to(tl.int64)
        p = ((b.to(tl.int64) * (gd * CELL) + z) * (gh * CELL) + cy * CELL + ly) * (gw * CELL) + cx * CELL + lx
        tl.store(out_ptr + p[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=vm[:, None] & cm[None, :])


def _tile(C: int, voxels: int = 4096) -> tuple[int, int]:
    """(voxels, channels) per program: up to 64 channels, about 4096 elements, no more voxels than ``voxels``
    needs (a cell's, for the scatter)."""
    bc = min(64, triton.next_power_of_2(max(C, 1)))
    return max(16, min(4096 // bc, triton.next_power_of_2(voxels))), bc


def _gather_triton(x: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> torch.Tensor:
    B, C, D, H, W = x.shape
    n, side = cells.shape[0], cell + 2 * halo
    out = torch.empty((n, side, side, side, C), device=x.device, dtype=x.dtype)
    if out.numel():
        bv, bc = _tile(C)
        grid = (n, triton.cdiv(side**3, bv), triton.cdiv(C, bc))
        _gather_kernel[grid](x, cells, out, n // B, D, H, W, C, lookup.shape[2], lookup.shape[3], *x.stride(),
                             CELL=cell, HALO=halo, BV=bv, BC=bc, num_warps=4)  # fmt: skip
    return out.permute(0, 4, 1, 2, 3)


def _scatter_triton(blocks: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> torch.Tensor:
    B, gd, gh, gw = lookup.shape
    C = blocks.shape[1]
    D, H, W = gd * cell, gh * cell, gw * cell
    blocks = blocks.contiguous(memory_format=_CL)
    out = torch.empty((B, D, H, W, C), device=blocks.device, dtype=blocks.dtype)
    if out.numel():
        bv, bc = _tile(C, cell**3)
        grid = (B * gd * gh * gw, triton.cdiv(cell**3, bv), triton.cdiv(C, bc))
        _scatter_kernel[grid](blocks, lookup.contiguous(), out, gd, gh, gw, C, CELL=cell, HALO=halo, BV=bv, BC=bc,
                              num_warps=4)  # fmt: skip
    return out.permute(0, 4, 1, 2, 3)


def _use_triton(t: torch.Tensor) -> bool:
    if not (_HAS_TRITON and t.is_cuda):
        return False
    from mambamim.ops.conv3d import triton_disabled

    return not triton_disabled("blocks")


def _gather_impl(x: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> torch.Tensor:
    if _use_triton(x):
        return _gather_triton(x, cells, lookup, cell, halo)
    return block_gather_ref(x, cells, lookup, cell, halo).contiguous(memory_format=_CL)


def _scatter_impl(blocks: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> torch.Tensor:
    if _use_triton(blocks):
        return _scatter_triton(blocks, cells, lookup, cell, halo)
    return block_scatter_ref(blocks, cells, lookup, cell, halo).contiguous(memory_format=_CL)


if hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("mambamim::block_gather", mutates_args=())
    def _gather_op(x: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> torch.Tensor:
        return _gather_impl(x, cells, lookup, cell, halo)

    @_gather_op.register_fake
    def _(x, cells, lookup, cell, halo):
        side = cell + 2 * halo
        return torch.empty((cells.shape[0], x.shape[1], side, side, side), dtype=x.dtype, device=x.device,
                           memory_format=_CL)  # fmt: skip

    @torch.library.custom_op("mambamim::block_scatter", mutates_args=())
    def _scatter_op(blocks: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int) -> torch.Tensor:
        return _scatter_impl(blocks, cells, lookup, cell, halo)

    @_scatter_op.register_fake
    def _(blocks, cells, lookup, cell, halo):
        B, gd, gh, gw = lookup.shape
        return torch.empty((B, blocks.shape[1], gd * cell, gh * cell, gw * cell), dtype=blocks.dtype,
                           device=blocks.device, memory_format=_CL)  # fmt: skip

    def _setup(ctx, inputs, output):
        _, cells, lookup, cell, halo = inputs
        ctx.save_for_backward(cells, lookup)
        ctx.cell, ctx.halo = cell, halo

    def _gather_backward(ctx, grad):
        cells, lookup = ctx.saved_tensors
        return _scatter_op(grad, cells, lookup, ctx.cell, ctx.halo), None, None, None, None

    def _scatter_backward(ctx, grad):
        cells, lookup = ctx.saved_tensors
        return _gather_op(grad, cells, lookup, ctx.cell, ctx.halo), None, None, None, None

    torch.library.register_autograd("mambamim::block_gather", _gather_backward, setup_context=_setup)
    torch.library.register_autograd("mambamim::block_scatter", _scatter_backward, setup_context=_setup)

    _gather, _scatter = _gather_op, _scatter_op

else:  # torch < 2.4: the differentiable reference
    _gather, _scatter = block_gather_ref, block_scatter_ref


def block_gather(x: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int = 0) -> torch.Tensor:
    """``(B, C, gd*s, gh*s, gw*s)`` -> ``(N, C, s + 2 halo, ...)`` channels-last blocks (see the module doc)."""
    _check_tables(cells, lookup, cell, halo)
    if x.dim() != 5 or x.shape[0] != lookup.shape[0] or tuple(x.shape[2:]) != tuple(g * cell for g in lookup.shape[1:]):
        raise ValueError(f"block_gather: x {tuple(x.shape)} is not {lookup.shape[0]} volumes of the "
                         f"{tuple(lookup.shape[1:])} grid of {cell}^3 cells")  # fmt: skip
    return _gather(x, cells, lookup, int(cell), int(halo))


def block_scatter(blocks: torch.Tensor, cells: torch.Tensor, lookup: torch.Tensor, cell: int, halo: int = 0) -> torch.Tensor:
    """``(N, C, s + 2 halo, ...)`` -> ``(B, C, gd*s, gh*s, gw*s)`` channels-last, overlaps summed (see the module doc)."""
    _check_tables(cells, lookup, cell, halo)
    side = cell + 2 * halo
    if blocks.dim() != 5 or blocks.shape[0] != cells.shape[0] or tuple(blocks.shape[2:]) != (side, side, side):
        raise ValueError(f"block_scatter: expected ({cells.shape[0]}, C, {side}, {side}, {side}) blocks, "
                         f"got {tuple(blocks.shape)}")  # fmt: skip
    return _scatter(blocks, cells, lookup, int(cell), int(halo))
