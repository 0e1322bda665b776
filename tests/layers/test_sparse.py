import pytest
import torch

from mambamim.layers.sparse import (
    SparseBatchNorm3d,
    SparseConv3d,
    SparseGroupNorm,
    SparseInstanceNorm3d,
    SparseLayerNorm3d,
    SparseMaxPool3d,
)


def block_mask(b=2, grid=(2, 2, 2), up=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(b, 1, *grid, generator=g) > 0.5).float()
    m[:, :, 0, 0, 0] = 1.0
    return m.repeat_interleave(up, 2).repeat_interleave(up, 3).repeat_interleave(up, 4)


def test_sparse_group_norm_equals_norm_of_gathered_visible_voxels():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8, 8)
    mask = block_mask()
    norm = SparseGroupNorm(3, 6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    y = norm(x, mask)
    for b in range(2):
        vis = mask[b, 0].bool()
        xv = x[b][:, vis]  # (C, Nvis)
        ref = torch.nn.functional.group_norm(xv[None, :, :, None, None], 3, norm.weight, norm.bias, 1e-5)[0, :, :, 0, 0]
        assert torch.allclose(y[b][:, vis], ref, atol=1e-5)
        assert (y[b][:, ~vis] == 0).all()


def test_sparse_instance_norm_equals_gathered():
    x = torch.randn(2, 4, 8, 8, 8)
    mask = block_mask(seed=1)
    y = SparseInstanceNorm3d(4)(x, mask)
    for b in range(2):
        vis = mask[b, 0].bool()
        xv = x[b][:, vis]
        ref = (xv - xv.mean(1, keepdim=True)) / torch.sqrt(xv.var(1, unbiased=False, keepdim=True) + 1e-5)
        assert torch.allclose(y[b][:, vis], ref, atol=1e-5)


def test_sparse_batch_norm_equals_gathered_and_updates_running_stats():
    x = torch.randn(2, 4, 8, 8, 8) * 3 + 1
    mask = block_mask(seed=2)
    bn = SparseBatchNorm3d(4, momentum=1.0)
    y = bn(x, mask)
    vis = mask[:, 0].bool()
    xv = x.permute(1, 0, 2, 3, 4)[:, vis]  # (C, N over batch)
    ref = (xv - xv.mean(1, keepdim=True)) / torch.sqrt(xv.var(1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(y.permute(1, 0, 2, 3, 4)[:, vis], ref, atol=1e-5)
    assert torch.allclose(bn.running_mean, xv.mean(1), atol=1e-5)
    assert torch.allclose(bn.running_var, xv.var(1, unbiased=True), atol=1e-4)


def test_conv_layer_norm_and_pool_zero_masked_positions():
    # A conv with a bias writes at masked positions; the sparse layers must zero them again, or the
    # next spatial op would carry them into visible positions.
    torch.manual_seed(0)
    mask = block_mask(seed=3)
    x = torch.randn(2, 3, 8, 8, 8) * mask
    conv = SparseConv3d(3, 5, 3, padding=1)
    assert (torch.nn.Conv3d.forward(conv, x) * (1 - mask)).abs().sum() > 0
    ln = SparseLayerNorm3d(5)
    pool = SparseMaxPool3d(2)
    pooled_mask = mask[:, :, ::2, ::2, ::2]
    y = ln(conv(x, mask), mask)
    assert (y * (1 - mask) == 0).all() and (y * mask).abs().sum() > 0
    out = pool(y, pooled_mask)
    assert (out * (1 - pooled_mask) == 0).all()
    # A visible pooled cell covers only visible voxels, so it equals the dense max over its block.
    dense = torch.nn.functional.max_pool3d(y, 2)
    assert torch.equal(out * pooled_mask, dense * pooled_mask)


@pytest.mark.parametrize("cls", [SparseGroupNorm, SparseBatchNorm3d, SparseLayerNorm3d])
def test_dense_path_matches_torch(cls):
    x = torch.randn(2, 4, 4, 4, 4)
    layer = cls(2, 4) if cls is SparseGroupNorm else cls(4)
    dense = {
        SparseGroupNorm: lambda: torch.nn.functional.group_norm(x, 2, layer.weight, layer.bias, layer.eps),
        SparseBatchNorm3d: lambda: torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True),
        SparseLayerNorm3d: lambda: torch.nn.functional.layer_norm(
            x.movedim(1, -1), (4,), layer.weight, layer.bias, layer.eps).movedim(-1, 1),
    }[cls]()  # fmt: skip
    assert torch.allclose(layer(x), dense, atol=1e-5)


def test_per_channel_group_norm_matches_general_path_and_keeps_channels_last():
    x = torch.randn(2, 4, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    mask = block_mask(seed=4)
    per_channel = SparseGroupNorm(4, 4)
    with torch.no_grad():
        per_channel.weight.uniform_(0.5, 1.5)
        per_channel.bias.uniform_(-1, 1)
    y = per_channel(x, mask)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    # Same statistics as the reshaping path (used for fewer groups than channels), forced here by
    # computing two-channel groups of a duplicated input.
    general = SparseGroupNorm(4, 8)
    with torch.no_grad():
        general.weight.copy_(per_channel.weight.repeat_interleave(2))
        general.bias.copy_(per_channel.bias.repeat_interleave(2))
    y2 = general(x.repeat_interleave(2, dim=1).contiguous(), mask)
    assert torch.allclose(y, y2[:, ::2], atol=1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_dense_per_channel_norm_matches_torch_eagerly(affine):
    x = (torch.randn(2, 5, 6, 7, 8, dtype=torch.float64) * 3 + 1).contiguous(memory_format=torch.channels_last_3d)
    ours = SparseInstanceNorm3d(5, affine=affine).double()
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-1, 1)
    ref = torch.nn.functional.instance_norm(x, weight=ours.weight, bias=ours.bias, eps=ours.eps)
    assert torch.allclose(ours(x), ref, atol=1e-10)


def test_channels_last_instance_norms_swaps_monai_norms_without_changing_the_network():
    from monai.networks.blocks import UnetrUpBlock

    from mambamim.layers.sparse import channels_last_instance_norms

    torch.manual_seed(0)
    block = UnetrUpBlock(3, 8, 4, 3, 2, ("instance", {"affine": True}), res_block=True).double()
    for m in block.modules():
        if isinstance(m, torch.nn.InstanceNorm3d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    keys = set(block.state_dict())
    x, skip = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64), torch.randn(2, 4, 6, 8, 10, dtype=torch.float64)
    ref = block(x, skip)
    channels_last_instance_norms(block)
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in block.modules())
    assert sum(isinstance(m, SparseInstanceNorm3d) for m in block.modules()) == 3
    assert set(block.state_dict()) == keys
    assert torch.allclose(block(x, skip), ref, atol=1e-10)


@pytest.mark.parametrize("affine", [False, True])
def test_dense_per_channel_norm_under_compile_matches_torch(affine):
    """Inside torch.compile the dense per-channel norm takes the reshape-free form (eager runs ATen's kernel):
    the same values and gradients as F.group_norm, channels-last kept."""
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 4, 5, 3, dtype=torch.float64) * 2 - 1).contiguous(memory_format=torch.channels_last_3d)
    norm = SparseInstanceNorm3d(3, affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    inputs = (x.requires_grad_(), norm.weight, norm.bias) if affine else (x.requires_grad_(),)
    torch._dynamo.reset()
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    dy = torch.randn_like(x)
    ours = torch.autograd.grad(y, inputs, dy)
    ref_y = torch.nn.functional.group_norm(x, 3, norm.weight, norm.bias, norm.eps)
    ref = torch.autograd.grad(ref_y, inputs, dy)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-12)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch._dynamo.reset()
