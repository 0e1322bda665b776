"""Metrics against hand-computed values and an independent brute-force HD95."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mambamim.evaluation.metrics import MetricTable, binary_metrics, case_metrics, evaluate_cases


def _cube(shape, start, size):
    m = np.zeros(shape, dtype=bool)
    sl = tuple(slice(s, s + size) for s in start)
    m[sl] = True
    return m


def _surface(mask):
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask)


def _brute_hd95(a, b, spacing):
    """Symmetric 95th-percentile surface distance, written independently of MONAI."""
    sa = np.argwhere(_surface(a)) * np.asarray(spacing)
    sb = np.argwhere(_surface(b)) * np.asarray(spacing)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_offset_cubes_dice_and_hd(k):
    n = 6
    a = _cube((16, 14, 12), (3, 4, 3), n)
    b = _cube((16, 14, 12), (3 + k, 4, 3), n)
    spacing = (1.5, 1.0, 2.0)
    r = binary_metrics(a, b, spacing, nsd_tolerance_mm=k * 1.5)
    # overlap (n - k) n^2 of 2 n^3 voxels
    assert r["dice"] == pytest.approx((n - k) / n, abs=1e-6)
    assert r["hd95"] == pytest.approx(_brute_hd95(a, b, spacing), abs=1e-4)
    assert r["hd95"] <= k * 1.5 + 1e-6
    # every surface voxel lies within k voxels along x of the other surface
    assert r["nsd"] == pytest.approx(1.0)
    tight = binary_metrics(a, b, spacing, nsd_tolerance_mm=0.5)
    assert 0.0 < tight["nsd"] < 1.0


def test_disjoint_small_cubes_hd95_exact():
    # 2-voxel cubes: every voxel is surface; distances are (k-1) and k voxels, 95th percentile = k
    k = 4
    a = _cube((12, 6, 6), (1, 2, 2), 2)
    b = _cube((12, 6, 6), (1 + k, 2, 2), 2)
    r = binary_metrics(a, b, (2.0, 1.0, 1.0), nsd_tolerance_mm=1.0)
    assert r["dice"] == 0.0
    assert r["hd95"] == pytest.approx(k * 2.0, abs=1e-5)
    assert r["nsd"] == 0.0


def test_identical_and_border_touching():
    a = _cube((8, 8, 8), (0, 0, 0), 5)  # touches the image border
    r = binary_metrics(a, a.copy(), (1.0, 1.0, 1.0))
    assert r == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}


def test_empty_conventions():
    z = np.zeros((6, 6, 6), bool)
    a = _cube((6, 6, 6), (1, 1, 1), 2)
    both = binary_metrics(z, z, (1, 1, 1))
    assert all(math.isnan(v) for v in both.values())
    assert binary_metrics(z, z, (1, 1, 1), both_empty="one")["dice"] == 1.0
    one = binary_metrics(a, z, (1.0, 2.0, 3.0))
    assert one["dice"] == 0.0 and one["nsd"] == 0.0
    assert one["hd95"] == pytest.approx(math.sqrt(6**2 + 12**2 + 18**2))
    assert binary_metrics(z, a, (1, 1, 1), hd95_one_empty="inf")["hd95"] == math.inf
    assert math.isnan(binary_metrics(z, a, (1, 1, 1), hd95_one_empty="nan")["hd95"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 1))
    with pytest.raises(ValueError, match="both_empty"):
        binary_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 1, 1), both_empty="x")


def test_evaluate_cases_table_roundtrip(tmp_path):
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    gt[7:11, 7:11, 7:11] = 2
    pred = gt.copy()
    pred[2:6, 2:6, 2:6] = 0
    pred[3:7, 2:6, 2:6] = 1  # class 1 shifted by one voxel: Dice 3/4
    pred2 = np.zeros_like(gt)  # nothing predicted
    table = evaluate_cases(
        [("a", pred, gt, (1, 1, 1)), ("b", pred2, gt, (1, 1, 1))], ["liver", "spleen", "absent"]
    )
    assert table.case_ids == ["a", "b"]
    r0 = table.rows[0]
    assert r0["dice_liver"] == pytest.approx(0.75)
    assert r0["dice_spleen"] == 1.0
    assert math.isnan(r0["dice_absent"])
    assert r0["dice_mean"] == pytest.approx((0.75 + 1.0) / 2)
    s = table.summary()
    assert s["classes"]["liver"]["dice_mean"] == pytest.approx(0.375)
    assert s["classes"]["absent"]["dice_n"] == 0
    assert s["mean"]["dice"] == pytest.approx((0.375 + 0.5) / 2)
    md = table.summary_markdown("t")
    assert "| liver | 0.3750 +- 0.3750" in md and "| absent | n/a" in md
    p = tmp_path / "per_case.csv"
    table.to_csv(p)
    back = MetricTable.from_csv(p)
    assert back.class_names == ["liver", "spleen", "absent"]
    for ra, rb in zip(table.rows, back.rows):
        for key in table.columns[1:]:
            assert (math.isnan(ra[key]) and math.isnan(rb[key])) or ra[key] == pytest.approx(rb[key])


def test_case_metrics_labels():
    gt = np.zeros((6, 6, 6), np.int64)
    gt[1:3, 1:3, 1:3] = 5
    out = case_metrics(gt, gt, (1, 1, 1), [5])
    assert out[5]["dice"] == 1.0
