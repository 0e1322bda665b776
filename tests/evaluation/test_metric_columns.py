"""per_case.csv column names without spaces (old files still read) and the NSD tolerance default."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mambamim.evaluation.metrics import MetricTable, binary_metrics, column_name, default_nsd_tolerance
from mambamim.evaluation.stats import compare_tables

SCORES = [{"right kidney": {"dice": 0.8, "hd95": 3.0, "nsd": 0.7}, "liver": {"dice": 0.9, "hd95": 2.0, "nsd": 0.95}},
          {"right kidney": {"dice": 0.6, "hd95": 9.0, "nsd": 0.5}, "liver": {"dice": 0.85, "hd95": 4.0, "nsd": 0.9}}]


def _table(names=("right kidney", "liver")):
    t = MetricTable(class_names=list(names))
    for i, s in enumerate(SCORES):
        t.add_case(f"c{i}", s)
    return t


def test_csv_header_has_no_spaces_and_round_trips(tmp_path):
    t = _table()
    t.to_csv(tmp_path / "per_case.csv")
    header = (tmp_path / "per_case.csv").read_text().splitlines()[0].split(",")
    assert not any(" " in h for h in header)
    assert "dice_right_kidney" in header and "nsd_liver" in header
    back = MetricTable.from_csv(tmp_path / "per_case.csv")
    assert back.class_names == ["right_kidney", "liver"]
    assert back.values("dice", "right_kidney") == [0.8, 0.6]
    assert back.values("dice", "right kidney") == [0.8, 0.6]  # either spelling finds the column
    assert back.rows[1]["dice_mean"] == pytest.approx((0.6 + 0.85) / 2)
    assert t.summary()["classes"]["right kidney"]["dice_mean"] == pytest.approx(0.7)


def test_old_csv_with_spaces_still_reads_and_compares(tmp_path):
    old = tmp_path / "old.csv"
    cols = ["case", "dice_right kidney", "hd95_right kidney", "nsd_right kidney", "dice_mean", "hd95_mean", "nsd_mean"]
    old.write_text(",".join(cols) + "\nc0,0.5,4.0,0.4,0.5,4.0,0.4\nc1,0.7,3.0,0.6,0.7,3.0,0.6\n")
    a = MetricTable.from_csv(old)
    assert a.class_names == ["right_kidney"]
    assert a.values("dice", "right kidney") == [0.5, 0.7]
    _table().to_csv(tmp_path / "new.csv")
    b = MetricTable.from_csv(tmp_path / "new.csv")
    shared, results = compare_tables(a, b, metrics=["dice"])
    res = {r.class_name: r for r in results}
    assert shared == ["c0", "c1"] and set(res) == {"right_kidney", "mean"}
    assert res["right_kidney"].mean_a == pytest.approx(0.6) and res["right_kidney"].mean_b == pytest.approx(0.7)
    # an in-memory table with the original names compares with the one read back
    _, results = compare_tables(_table(), b, metrics=["dice"])
    assert results[0].n == 2 and results[0].mean_diff == pytest.approx(0.0)


def test_clashing_column_names_are_refused():
    assert column_name(" left  lung ") == "left_lung" and column_name("a/b,c") == "a_b_c"
    with pytest.raises(ValueError, match="clashing"):
        MetricTable(class_names=["right kidney", "right_kidney"])


def test_nsd_tolerance_defaults_to_the_mean_spacing():
    assert default_nsd_tolerance((6.0, 6.0, 6.0)) == 6.0
    assert default_nsd_tolerance((2.0, 2.0, 3.5)) == pytest.approx(2.5)
    gt = np.zeros((12, 12, 12), bool)
    gt[3:8, 3:8, 3:8] = True
    pred = np.roll(gt, 1, axis=0)  # one 6 mm voxel off
    default = binary_metrics(pred, gt, (6.0, 6.0, 6.0))
    assert default["nsd"] == pytest.approx(1.0)  # within one voxel: a match
    one_mm = binary_metrics(pred, gt, (6.0, 6.0, 6.0), nsd_tolerance_mm=1.0)
    assert one_mm["nsd"] < 0.9
    assert binary_metrics(pred, gt, (6.0, 6.0, 6.0), nsd_tolerance_mm=6.0)["nsd"] == default["nsd"]
    with pytest.raises(ValueError):
        default_nsd_tolerance((0.0, 1.0, 1.0))


def test_summary_states_the_tolerance():
    t = MetricTable(class_names=["liver"], nsd_tolerance_mm=6.0)
    t.add_case("c0", {"liver": {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}})
    assert t.summary()["nsd_tolerance_mm"] == 6.0
    md = t.summary_markdown()
    assert "surface Dice (6 mm)" in md and "within 6 mm" in md
    assert "nsd_tolerance_mm" not in _table().summary()
    assert not math.isnan(_table().summary()["mean"]["hd95"])
