"""Bottleneck masks: exact counts, reproducibility, nearest upsampling, validation."""

from __future__ import annotations

import pytest
import torch

from mambamim.masking import num_visible, random_bottleneck_mask, stage_masks, upsample_mask, validate_mask


@pytest.mark.parametrize("ratio,expected", [(0.75, 54), (0.0, 216), (0.9, 22), (0.25, 162), (0.999, 1)])
def test_exact_visible_counts(ratio, expected):
    m = random_bottleneck_mask(5, (6, 6, 6), ratio, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == (5, 6, 6, 6)
    assert m.flatten(1).sum(1).tolist() == [expected] * 5
    assert num_visible(216, ratio) == expected
    assert validate_mask(m, (6, 6, 6)) == expected


def test_bad_ratio():
    for r in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            random_bottleneck_mask(2, (2, 2, 2), r)


def test_reproducible_and_random():
    a = random_bottleneck_mask(4, (3, 4, 5), 0.5, generator=torch.Generator().manual_seed(7))
    b = random_bottleneck_mask(4, (3, 4, 5), 0.5, generator=torch.Generator().manual_seed(7))
    c = random_bottleneck_mask(4, (3, 4, 5), 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 4))  # samples differ


def test_uniform_over_positions():
    m = random_bottleneck_mask(4000, (2, 2, 2), 0.75, generator=torch.Generator().manual_seed(0))
    freq = m.float().mean(0).flatten()  # each position visible with prob 2/8
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.03)


def test_upsample_constant_on_blocks():
    m = random_bottleneck_mask(2, (2, 3, 2), 0.5, generator=torch.Generator().manual_seed(1))
    up = upsample_mask(m, 16)
    assert up.shape == (2, 1, 32, 48, 32) and up.dtype == torch.float32
    blocks = up[:, 0].reshape(2, 2, 16, 3, 16, 2, 16)
    assert torch.equal(blocks.amin(dim=(2, 4, 6)), blocks.amax(dim=(2, 4, 6)))
    assert torch.equal(blocks.amax(dim=(2, 4, 6)), m.float())
    assert torch.equal(upsample_mask(m, (4, 6, 4)), upsample_mask(m, 2))
    with pytest.raises(ValueError):
        upsample_mask(m, (5, 6, 4))


def test_stage_masks():
    m = random_bottleneck_mask(3, (2, 2, 3), 0.5, generator=torch.Generator().manual_seed(2))
    stages = stage_masks(m, (32, 32, 48), 5)
    assert [tuple(s.shape[2:]) for s in stages] == [(32, 32, 48), (16, 16, 24), (8, 8, 12), (4, 4, 6), (2, 2, 3)]
    assert torch.equal(stages[-1][:, 0], m.float())
    for finer, coarser in zip(stages[:-1], stages[1:]):
        assert torch.equal(torch.nn.functional.max_pool3d(finer, 2), coarser)
    with pytest.raises(ValueError):
        stage_masks(m, (32, 32, 40), 5)


def test_validate_mask_errors():
    good = random_bottleneck_mask(2, (2, 2, 2), 0.5)
    with pytest.raises(ValueError, match="shape"):
        validate_mask(good, (2, 2, 3))
    with pytest.raises(ValueError, match="bool"):
        validate_mask(good.float(), (2, 2, 2))
    empty = good.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="no visible"):
        validate_mask(empty, (2, 2, 2))
    uneven = good.clone()
    uneven[0] = True
    with pytest.raises(ValueError, match="differ"):
        validate_mask(uneven, (2, 2, 2))


def test_gather_and_scatter_blocks():
    import torch.nn.functional as F

    from mambamim.masking import gather_blocks, scatter_blocks

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 12, 16, generator=g, dtype=torch.float64)
    mask = random_bottleneck_mask(2, (2, 3, 4), 0.5, generator=g)
    k = validate_mask(mask, (2, 3, 4))
    dense_mask = stage_masks(mask, x.shape[2:], 1, x.dtype)[0]
    # no halo: exactly the visible cells; scattering them back is x with the masked cells zeroed
    blocks = gather_blocks(x, mask, k)
    assert blocks.shape == (2 * k, 3, 4, 4, 4)
    assert torch.equal(scatter_blocks(blocks, mask, k), x * dense_mask)
    cl = scatter_blocks(blocks, mask, k, like=x.contiguous(memory_format=torch.channels_last_3d))
    assert cl.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(cl, x * dense_mask)
    # with a halo, a "valid" conv per block equals the padded dense conv at the visible voxels
    w = torch.randn(5, 3, 3, 3, 3, generator=g, dtype=torch.float64)
    xm = (x * dense_mask).requires_grad_(True)
    per_block = scatter_blocks(F.conv3d(gather_blocks(xm, mask, k, halo=1), w), mask, k)
    dense = F.conv3d(xm, w, padding=1) * dense_mask
    torch.testing.assert_close(per_block, dense, rtol=0, atol=1e-12)
    # and so do the gradients (the halo reads neighbours, which get their share)
    gy = torch.randn(dense.shape, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad(per_block, xm, gy)
    (gb,) = torch.autograd.grad(dense, xm, gy)
    torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="mask grid"):
        gather_blocks(torch.zeros(2, 1, 9, 12, 16), mask, k)
    with pytest.raises(ValueError, match="blocks"):
        scatter_blocks(blocks[:-1], mask, k)


def test_blocks_round_trip_under_torch_compile():
    """gather -> valid conv -> scatter, forward and backward, compiled (fullgraph) == eager."""
    import torch.nn.functional as F

    from mambamim.masking import gather_blocks, scatter_blocks

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 8, 8, generator=g)
    w = torch.randn(3, 2, 3, 3, 3, generator=g)
    mask = random_bottleneck_mask(2, (2, 2, 2), 0.5, generator=g)

    def f(x, w):
        return scatter_blocks(F.conv3d(gather_blocks(x, mask, 4, halo=1), w), mask, 4).square().sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        fn(xl, wl).backward()
        grads.append((xl.grad, wl.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
