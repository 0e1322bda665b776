"""Fig. 9 rendering: PNG written atomically with the expected size and content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from mambamim.pretrain.loss import patch_normalize
from mambamim.pretrain.visualize import render_reconstruction

MASK_RGB = np.array([0x2B, 0x3A, 0x5C]) / 255.0


def _volume(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y, z = torch.meshgrid(*(torch.linspace(-1, 1, 32),) * 3, indexing="ij")
    img = 0.5 * ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1).float() + 0.05 * torch.rand(32, 32, 32, generator=g)
    return img[None]  # (1, 32, 32, 32)


def _mask_fraction(png):
    rgb = imread(png)[..., :3]
    return float((np.abs(rgb - MASK_RGB).max(-1) < 2 / 255).mean())


def test_png_written_with_expected_size(tmp_path):
    img = _volume()
    rec = patch_normalize(img[None], 16)[0]
    visible = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    out = render_reconstruction(img, rec, visible, tmp_path / "sub" / "fig.png", panel_inches=1.0, dpi=50)
    assert out == tmp_path / "sub" / "fig.png"
    assert imread(out).shape[:2] == (150, 150)
    assert 0.05 < _mask_fraction(out) < 0.8  # the masked-input column shows masked patches
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["fig.png"]  # no temp file left behind
    # numpy / batched inputs, a title and explicit slices
    out2 = render_reconstruction(
        img[None].numpy(), rec[None].numpy(), visible[None].numpy(), tmp_path / "fig2.png",
        slices=(3, 20, 31), title="t", panel_inches=1.0, dpi=50,
    )
    assert imread(out2).shape[:2] == (170, 150)


def test_all_visible_shows_no_mask(tmp_path):
    img = _volume(1)
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    out = render_reconstruction(img, torch.zeros_like(img), visible, tmp_path / "f.png", panel_inches=1.0, dpi=50)
    assert _mask_fraction(out) == 0.0


def test_bad_inputs(tmp_path):
    img = _volume()
    with pytest.raises(ValueError):
        render_reconstruction(img, img, torch.ones(3, 2, 2, dtype=torch.bool), tmp_path / "a.png")
    with pytest.raises(ValueError):
        render_reconstruction(img, img[:, :16], torch.ones(2, 2, 2, dtype=torch.bool), tmp_path / "a.png")
    with pytest.raises(ValueError):
        render_reconstruction(img, img, torch.ones(2, 2, 2, dtype=torch.bool), tmp_path / "a.png", slices=(0, 0, 32))
    assert not (tmp_path / "a.png").exists()
