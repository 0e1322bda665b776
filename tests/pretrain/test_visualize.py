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


def _column_mask_fraction(png, column):
    """Share of mask-coloured pixels in one of the four image columns (panel_inches=1, dpi=50: 50 px each)."""
    rgb = imread(png)[..., :3]
    left, right = 0.045 * rgb.shape[1], 4 / 5.0 * rgb.shape[1]  # the image grid's margins (see _draw)
    step = (right - left) / 4
    part = rgb[:, int(left + step * column) + 4: int(left + step * (column + 1)) - 4]
    return float((np.abs(part - MASK_RGB).max(-1) < 2 / 255).mean())


def test_png_written_with_expected_size(tmp_path):
    img = _volume()
    rec = patch_normalize(img[None], 16)[0]
    visible = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    out = render_reconstruction(img, rec, visible, tmp_path / "sub" / "fig.png", panel_inches=1.0, dpi=50)
    assert out == tmp_path / "sub" / "fig.png"
    assert imread(out).shape[:2] == (150, 250)
    assert 0.05 < _mask_fraction(out) < 0.8  # masked input and target columns show masked patches
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["fig.png"]  # no temp file left behind
    # numpy / batched inputs, a title, explicit slices and a HU window
    out2 = render_reconstruction(
        img[None].numpy(), rec[None].numpy(), visible[None].numpy(), tmp_path / "fig2.png",
        slices=(3, 20, 31), title="t", panel_inches=1.0, dpi=50, window=(-175.0, 250.0),
    )
    assert imread(out2).shape[:2] == (170, 250)


def test_masked_input_and_target_columns_are_complementary(tmp_path):
    img = _volume(2)
    visible = torch.zeros(2, 2, 2, dtype=torch.bool)
    visible[0] = True  # the x < 16 half is visible
    out = render_reconstruction(img, torch.zeros_like(img), visible, tmp_path / "f.png", panel_inches=1.0, dpi=50)
    masked_in, target = _column_mask_fraction(out, 1), _column_mask_fraction(out, 3)
    assert _column_mask_fraction(out, 0) == 0.0 and _column_mask_fraction(out, 2) == 0.0
    assert masked_in > 0.1 and target > 0.1


def test_all_visible_shows_no_mask_in_the_input_columns(tmp_path):
    img = _volume(1)
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    out = render_reconstruction(img, torch.zeros_like(img), visible, tmp_path / "f.png", panel_inches=1.0, dpi=50)
    assert _column_mask_fraction(out, 1) == 0.0  # nothing masked: the encoder sees everything
    assert _column_mask_fraction(out, 3) > 0.5  # and the loss has no target


def test_bad_inputs(tmp_path):
    img = _volume()
    with pytest.raises(ValueError):
        render_reconstruction(img, img, torch.ones(3, 2, 2, dtype=torch.bool), tmp_path / "a.png")
    with pytest.raises(ValueError):
        render_reconstruction(img, img[:, :16], torch.ones(2, 2, 2, dtype=torch.bool), tmp_path / "a.png")
    with pytest.raises(ValueError):
        render_reconstruction(img, img, torch.ones(2, 2, 2, dtype=torch.bool), tmp_path / "a.png", slices=(0, 0, 32))
    assert not (tmp_path / "a.png").exists()
