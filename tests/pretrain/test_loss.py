"""Masked per-patch-normalised MSE and the patch helpers."""

from __future__ import annotations

import pytest
import torch

from mambamim.masking import random_bottleneck_mask
from mambamim.pretrain.loss import (
    denormalize_patches,
    masked_patch_mse,
    patch_normalize,
    patchify,
    unpatchify,
)

P = 4  # small patches keep the tests fast; the default 16 is checked once below


def _data(B=2, C=2, grid=(2, 3, 2), p=P, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, grid[0] * p, grid[1] * p, grid[2] * p)
    target = torch.rand(shape, generator=g) * 3 + torch.arange(B * C).view(B, C, 1, 1, 1)
    visible = random_bottleneck_mask(B, grid, 0.5, generator=g)
    return target, visible, g


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 8, 12, 4)
    pt = patchify(x, 4)
    assert pt.shape == (2, 6, 3, 64)
    assert torch.equal(unpatchify(pt, (2, 3, 1), 4), x)
    # patch l = (i, j, k) in raster order holds x[..., 4i:4i+4, 4j:4j+4, 4k:4k+4]
    assert torch.equal(pt[1, 4, 2], x[1, 2, 4:8, 4:8, 0:4].reshape(-1))


def test_perfect_reconstruction_gives_zero_and_errors_positive():
    target, visible, g = _data()
    norm = patch_normalize(target, P)
    per_patch = patchify(norm, P)
    torch.testing.assert_close(per_patch.mean(-1), torch.zeros_like(per_patch.mean(-1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_patch.var(-1), torch.ones_like(per_patch.var(-1)), atol=1e-4, rtol=0)
    assert masked_patch_mse(norm, target, visible, P).item() < 1e-10
    noisy = norm + 0.1 * torch.randn(norm.shape, generator=g)
    loss = masked_patch_mse(noisy, target, visible, P)
    assert 0.005 < loss.item() < 0.02  # ~0.1^2
    assert masked_patch_mse(torch.zeros_like(target), target, visible, P).item() == pytest.approx(1.0, abs=0.02)


def test_visible_patches_are_ignored():
    target, visible, g = _data(seed=1)
    rec = torch.randn(target.shape, generator=g)
    base = masked_patch_mse(rec, target, visible, P)
    vis_vox = (visible.repeat_interleave(P, 1).repeat_interleave(P, 2).repeat_interleave(P, 3)).unsqueeze(1)
    changed = torch.where(vis_vox, torch.full_like(rec, float("nan")), rec)
    assert torch.equal(masked_patch_mse(changed, target, visible, P), base)
    changed = torch.where(vis_vox, rec + 100, rec)
    assert torch.equal(masked_patch_mse(changed, target, visible, P), base)
    # the masked part does count
    changed = torch.where(vis_vox, rec, rec + 1)
    assert masked_patch_mse(changed, target, visible, P) != base
    rec.requires_grad_(True)
    masked_patch_mse(rec, target, visible, P).backward()
    assert torch.all(rec.grad[vis_vox.expand_as(rec)] == 0)
    assert rec.grad[~vis_vox.expand_as(rec)].abs().sum() > 0


def test_average_over_masked_patches_only():
    # one masked patch with error e everywhere: the loss is e^2 whatever the number of visible patches
    target, _, _ = _data(B=1, C=1, grid=(2, 2, 2), seed=2)
    visible = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    visible[0, 1, 0, 1] = False
    rec = patch_normalize(target, P) + 0.5
    assert masked_patch_mse(rec, target, visible, P).item() == pytest.approx(0.25, rel=1e-5)


def test_denormalize_inverts_normalize_and_default_patch():
    target = torch.rand(1, 1, 32, 16, 16) * 400 - 100
    norm = patch_normalize(target)
    torch.testing.assert_close(denormalize_patches(norm, target), target, atol=1e-3, rtol=1e-4)
    visible = torch.tensor([[[[True]], [[False]]]])
    assert masked_patch_mse(norm, target, visible).item() < 1e-10


def test_validation():
    target, visible, _ = _data()
    with pytest.raises(ValueError):
        masked_patch_mse(target, target, visible.float(), P)
    with pytest.raises(ValueError):
        masked_patch_mse(target, target, visible[:, :1], P)
    with pytest.raises(ValueError):
        masked_patch_mse(target[..., :-1], target[..., :-1], visible, P)


def _reference_loss(rec, target, visible, p, eps=1e-6):
    """The loss written with patchify (SPEC 2.8 read literally), float64."""
    t = patchify(target.double(), p)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + eps).sqrt()
    err = (patchify(rec.double(), p) - t).square().mean(dim=(-1, -2))  # (B, L)
    masked = (~visible).flatten(1)
    return (err * masked).sum() / masked.sum()


@pytest.mark.parametrize("channels_last", [False, True])
def test_loss_and_gradient_match_the_patchify_reference(channels_last):
    target, visible, g = _data(B=2, C=1, seed=3)
    rec = torch.randn(target.shape, generator=g, dtype=torch.float64)
    if channels_last:
        target = target.contiguous(memory_format=torch.channels_last_3d)
        rec = rec.contiguous(memory_format=torch.channels_last_3d)
    rec.requires_grad_(True)
    ref_rec = rec.detach().clone().requires_grad_(True)
    loss = masked_patch_mse(rec, target.double(), visible, P)
    ref = _reference_loss(ref_rec, target, visible, P)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(rec.grad, ref_rec.grad, rtol=1e-10, atol=1e-15)
    # two channels: per-patch statistics per channel, averaged over channels
    target2, visible2, g2 = _data(B=2, C=2, seed=4)
    rec2 = torch.randn(target2.shape, generator=g2, dtype=torch.float64)
    torch.testing.assert_close(masked_patch_mse(rec2, target2.double(), visible2, P),
                               _reference_loss(rec2, target2, visible2, P), rtol=1e-12, atol=0)  # fmt: skip
