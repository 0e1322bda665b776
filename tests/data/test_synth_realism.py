"""Synthetic CT phantoms look like CT: HU per tissue, texture, variability, air, bone, lungs, bowel gas, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from mambamim.data.synth import BTCV_LABELS, ORGAN_HU, _smooth_field, make_phantom

MED = dict(inplane_voxels=(72, 96), inplane_spacing=(3.5, 4.5), slice_spacing=(4.0, 5.0))
COARSE = dict(inplane_voxels=(56, 72), inplane_spacing=(5.0, 6.0), slice_spacing=(6.0, 8.0))  # the CPU demo's

# Realistic range of each organ's median HU (interior, portal-venous phase as ORGAN_HU models it).
MEDIAN_HU = {1: (30, 70), 2: (120, 185), 3: (120, 185), 4: (-10, 35), 5: (0, 70), 6: (40, 80), 7: (-10, 70),
             8: (140, 220), 9: (130, 210), 10: (110, 210), 11: (20, 65), 12: (-20, 70), 13: (-20, 70)}


@pytest.fixture(scope="module")
def cases():
    """Four medium-resolution phantoms: (image, label, spacing, body mask)."""
    out = []
    for s in range(4):
        ph = make_phantom([s, 11], **MED)
        body = np.stack([ndimage.binary_fill_holes(ph.image[:, :, k] > -500) for k in range(ph.image.shape[2])], 2)
        out.append((ph.image, ph.label, np.asarray(ph.info["spacing"]), body))
    return out


def _lag_cov(image: np.ndarray, mask: np.ndarray, lag: int) -> float:
    """Mean in-plane covariance (HU^2) of voxel pairs ``lag`` voxels apart, both inside ``mask``."""
    covs = []
    for ax in (0, 1):
        a, m = np.moveaxis(image, ax, 0).astype(np.float64), np.moveaxis(mask, ax, 0)
        both = m[:-lag] & m[lag:]
        x, y = a[:-lag][both], a[lag:][both]
        covs.append(float(np.mean((x - x.mean()) * (y - y.mean()))))
    return float(np.mean(covs))


def test_organ_median_hu_realistic(cases):
    for image, label, _, _ in cases:
        for lab, (lo, hi) in MEDIAN_HU.items():
            interior = ndimage.binary_erosion(label == lab)
            vals = image[interior] if interior.sum() >= 10 else image[label == lab]
            assert lo <= np.median(vals) <= hi, (BTCV_LABELS[lab], float(np.median(vals)))
        # bright vessels and kidneys above parenchyma, bile below
        med = {lab: np.median(image[ndimage.binary_erosion(label == lab)]) for lab in (1, 2, 4, 6, 8)}
        assert med[8] > med[6] + 60 and med[2] > med[6] + 50 and med[4] < med[6] - 20 and med[4] < med[1]


def test_large_organs_have_texture_beyond_noise(cases):
    # white-ish scanner noise is uncorrelated 3 voxels (>= 10 mm) apart; tissue texture is not
    covs = [_lag_cov(image, ndimage.binary_erosion(label == 6, iterations=2), 3) for image, label, _, _ in cases]
    assert np.mean(covs) > 8.0, covs
    for image, label, _, _ in cases:
        for lab in (1, 6):
            assert image[ndimage.binary_erosion(label == lab, iterations=2)].std() > 5.0


def test_kidney_cortex_brighter_than_medulla():
    ph = make_phantom(5)  # default (fine) resolution
    kidney = ph.label == 2
    shell = ndimage.binary_erosion(kidney, iterations=1) & ~ndimage.binary_erosion(kidney, iterations=3)
    core = ndimage.binary_erosion(kidney, iterations=5)
    assert core.sum() > 20
    assert np.median(ph.image[shell]) > np.median(ph.image[core]) + 15


def test_shapes_and_positions_vary_between_cases(cases):
    vol = {lab: [] for lab in (1, 2, 6, 7)}
    cen = {lab: [] for lab in (1, 2, 6, 7)}
    for _, label, sp, _ in cases:
        for lab in vol:
            m = label == lab
            vol[lab].append(m.sum() * np.prod(sp))
            # centroid relative to the body centre, mm
            cen[lab].append((np.argwhere(m).mean(0) - np.array(label.shape) / 2) * sp)
    for lab in vol:
        assert np.std(vol[lab]) / np.mean(vol[lab]) > 0.08, (BTCV_LABELS[lab], vol[lab])
        assert np.linalg.norm(np.std(cen[lab], axis=0)) > 4.0, (BTCV_LABELS[lab], cen[lab])


def test_air_outside_body_and_gas_inside(cases):
    for image, label, _, body in cases:
        outside = image[~ndimage.binary_dilation(body, iterations=2)]
        assert abs(np.median(outside) + 1000) < 15 and np.percentile(outside, 99) < -900
        # bowel / stomach gas: very dark voxels inside the body below the lungs' level, not only lungs
        gas = (image < -700) & body
        z_liver = np.argwhere(label == 6)[:, 2].mean()
        assert gas[:, :, : int(z_liver)].sum() > 50


def test_bone_is_bright_and_in_the_spine(cases):
    for image, label, sp, body in cases:
        bone = (image > 150) & (label == 0) & body
        assert 100 < bone.sum() * np.prod(sp) / 1000 < 3000  # ml of bone and bright tissue
        cx = int(round(np.argwhere(body[:, :, body.shape[2] // 2]).mean(0)[0]))
        column = image[cx - 1:cx + 2, :, :]
        assert np.percentile(column, 99) > 300  # vertebral cortex in the midline
        assert np.median(image[bone]) > 200


def test_lungs_above_diaphragm(cases):
    for image, label, sp, body in cases:
        lungs = (image < -700) & (label == 0) & body
        top = lungs[:, :, -3:].sum() / max(body[:, :, -3:].sum(), 1)
        bottom = lungs[:, :, :3].sum() / max(body[:, :, :3].sum(), 1)
        assert top > 0.15 and top > 3 * bottom, (top, bottom)
        zl = np.argwhere(lungs)[:, 2]
        assert np.median(zl) > np.argwhere(label == 6)[:, 2].mean()
        assert -920 < np.median(image[lungs]) < -750


def test_every_label_present_at_default_resolution():
    for seed in (0, 1):
        ph = make_phantom(seed)
        counts = np.bincount(ph.label.ravel(), minlength=14)
        assert counts.size == 14 and np.all(counts[1:] >= 10), counts
        assert set(ORGAN_HU) == set(range(1, 14))


def test_smooth_field_statistics():
    rng = np.random.default_rng(0)
    f = _smooth_field(rng, (48, 48, 48), (1.0, 1.0, 1.0), 6.0)
    assert f.dtype == np.float32 and f.shape == (48, 48, 48)
    assert 0.8 < f.std() < 1.2 and abs(float(f.mean())) < 0.3
    near = np.corrcoef(f[:-1].ravel(), f[1:].ravel())[0, 1]
    far = np.corrcoef(f[:-20].ravel(), f[20:].ravel())[0, 1]
    assert near > 0.9 and abs(far) < 0.2
    # voxels coarser than the texture average it out (partial volume)
    coarse = _smooth_field(rng, (24, 24, 24), (12.0, 12.0, 12.0), 6.0)
    assert coarse.std() < 0.6


def test_coarse_phantom_is_fast():
    make_phantom(0, **COARSE)
    t = time.perf_counter()
    for s in range(3):
        make_phantom(s, **COARSE)
    assert (time.perf_counter() - t) / 3 < 1.0  # ~0.05-0.1 s on one free core; generous for a shared machine
