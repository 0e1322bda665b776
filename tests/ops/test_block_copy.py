"""Block gather / scatter (the sparse full-resolution path's data movement): the custom ops against
the advanced-indexing reference, adjointness in float64, gradients, torch.compile, and the Triton
kernels (CUDA; plus an interpreter run on CPU tensors when triton is installed)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from _interpreter import run_interpreter_check

from mambamim.masking import block_tables, random_bottleneck_mask
from mambamim.ops.block_copy import block_gather, block_gather_ref, block_scatter, block_scatter_ref

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


def _case(batch=2, channels=5, grid=(3, 2, 4), cell=4, ratio=0.5, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = random_bottleneck_mask(batch, grid, ratio, generator=g)
    k = int(mask[0].sum())
    cells, lookup = block_tables(mask, k)
    x = torch.randn(batch, channels, *(s * cell for s in grid), generator=g, dtype=torch.float64).to(device, dtype)
    return x, mask, k, cells.to(device), lookup.to(device)


def test_tables_describe_the_visible_cells():
    _, mask, k, cells, lookup = _case(batch=3)
    assert cells.shape == (3 * k,) and lookup.dtype == torch.int32
    flat = mask.flatten(1)
    for b in range(3):
        mine = cells[b * k:(b + 1) * k]
        assert torch.equal(mine, flat[b].nonzero().squeeze(1))  # raster order, sample-major
        assert torch.equal(lookup.flatten(1)[b][mine], torch.arange(b * k, (b + 1) * k, dtype=torch.int32))
        assert (lookup.flatten(1)[b][~flat[b]] == -1).all()


@pytest.mark.parametrize("halo", [0, 1, 3])
def test_ops_match_reference_and_are_adjoint(halo):
    x, mask, k, cells, lookup = _case()
    blocks = block_gather(x, cells, lookup, 4, halo)
    torch.testing.assert_close(blocks, block_gather_ref(x, cells, lookup, 4, halo), rtol=0, atol=0)
    assert blocks.is_contiguous(memory_format=torch.channels_last_3d)
    y = torch.randn_like(blocks)
    dense = block_scatter(y, cells, lookup, 4, halo)
    torch.testing.assert_close(dense, block_scatter_ref(y, cells, lookup, 4, halo))
    # <G x, y> = <x, S y>: the scatter (overlaps summed, outside dropped) is the gather's adjoint
    torch.testing.assert_close((blocks * y).sum(), (x * dense).sum())
    if halo == 0:
        keep = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3).unsqueeze(1)
        torch.testing.assert_close(block_scatter(blocks, cells, lookup, 4, 0), x * keep, rtol=0, atol=0)


def test_gradients_and_compile():
    x, mask, k, cells, lookup = _case(channels=3, grid=(2, 2, 2), cell=3)

    def fn(t):
        blocks = block_gather(t, cells, lookup, 3, 1)
        return block_scatter(blocks.sin(), cells, lookup, 3, 1)

    torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),))
    compiled = torch.compile(fn, fullgraph=True)
    leaf = x.clone().requires_grad_(True)
    out = compiled(leaf)
    out.square().sum().backward()
    ref_leaf = x.clone().requires_grad_(True)
    fn(ref_leaf).square().sum().backward()
    torch.testing.assert_close(out, fn(x))
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="needs torch.library.opcheck")
def test_custom_op_registration():
    """Schema, fake kernels (shapes and channels-last strides as the real kernels) and autograd rules."""
    x, mask, k, cells, lookup = _case(channels=3, grid=(2, 1, 2), cell=3)
    torch.library.opcheck(torch.ops.mambamim.block_gather.default, (x.requires_grad_(True), cells, lookup, 3, 1))
    blocks = torch.randn(len(cells), 3, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.mambamim.block_scatter.default, (blocks, cells, lookup, 3, 1))


def test_bad_arguments():
    x, mask, k, cells, lookup = _case()
    with pytest.raises(ValueError, match="halo"):
        block_gather(x, cells, lookup, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        block_gather(x[..., :-1], cells, lookup, 4, 1)
    with pytest.raises(ValueError, match="blocks"):
        block_scatter(torch.zeros(len(cells), 5, 4, 4, 5, dtype=x.dtype), cells, lookup, 4, 0)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels,halo", [(5, 1), (48, 2), (70, 0)])
def test_cuda_kernels(dtype, channels, halo):
    x, mask, k, cells, lookup = _case(channels=channels, grid=(3, 3, 2), cell=6, seed=3, device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    leaf = x.clone().requires_grad_(True)
    blocks = block_gather(leaf, cells, lookup, 6, halo)
    ref = block_gather_ref(x.double(), cells, lookup, 6, halo)
    assert torch.equal(blocks.double(), ref)
    gy = torch.randn_like(blocks)
    blocks.backward(gy)
    torch.testing.assert_close(leaf.grad.double(), block_scatter_ref(gy.double(), cells, lookup, 6, halo),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs triton; on GPUs the CUDA tests cover it")
def test_interpreter_parity():
    """The Triton kernels under TRITON_INTERPRET=1 on CPU tensors (a subprocess: the flag is read at import)."""
    run_interpreter_check(__file__)


def _interpreter_check() -> None:
    from mambamim.ops import block_copy

    for channels, grid, cell, halo in [(5, (3, 2, 2), 4, 1), (70, (2, 2, 1), 3, 0), (3, (2, 1, 2), 5, 2)]:
        x, mask, k, cells, lookup = _case(channels=channels, grid=grid, cell=cell, seed=channels, dtype=torch.float32)
        for xin in (x, x.contiguous(memory_format=torch.channels_last_3d)):
            blocks = block_copy._gather_triton(xin, cells, lookup, cell, halo)
            assert torch.equal(blocks, block_gather_ref(x, cells, lookup, cell, halo)), (channels, halo)
        y = torch.randn_like(blocks)
        dense = block_copy._scatter_triton(y, cells, lookup, cell, halo)
        torch.testing.assert_close(dense, block_scatter_ref(y, cells, lookup, cell, halo), rtol=1e-6, atol=1e-6)
        print("interpreter", channels, grid, cell, halo, "ok")
    print("INTERPRETER OK")


if __name__ == "__main__" and "--interpreter-check" in sys.argv:
    _interpreter_check()
