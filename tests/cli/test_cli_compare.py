"""``mambamim compare`` end to end on two hand-written per_case.csv files."""

from __future__ import annotations

import json

import pytest
from scipy import stats as sps

from mambamim.cli.main import main
from mambamim.evaluation.metrics import MetricTable

A = [0.81, 0.74, 0.90, 0.66, 0.72, 0.85]
B = [0.84, 0.79, 0.91, 0.71, 0.70, 0.88]


def _write(folder, values, cases):
    t = MetricTable(class_names=["liver"])
    for c, v in zip(cases, values):
        t.add_case(c, {"liver": {"dice": v, "hd95": 20 * (1 - v), "nsd": v}})
    folder.mkdir(parents=True, exist_ok=True)
    t.to_csv(folder / "per_case.csv")


def test_compare_cli(tmp_path, capsys):
    cases = [f"case{i}" for i in range(6)]
    _write(tmp_path / "scratch", A, cases)
    _write(tmp_path / "pretrained", B + [0.5], cases + ["extra"])
    out = tmp_path / "cmp"
    rc = main(["compare", str(tmp_path / "scratch"), str(tmp_path / "pretrained"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| liver | dice | 6 |" in text and "scratch" in text and "pretrained" in text
    payload = json.loads((out / "comparison.json").read_text())
    assert payload["shared_cases"] == cases
    res = {(r["class_name"], r["metric"]): r for r in payload["results"]}
    assert res[("liver", "dice")]["p_ttest"] == pytest.approx(sps.ttest_rel(A, B).pvalue)
    assert res[("liver", "dice")]["p_wilcoxon"] == pytest.approx(sps.wilcoxon(A, B).pvalue)
    assert res[("liver", "dice")]["mean_b"] == pytest.approx(sum(B) / 6)
    assert (out / "comparison.md").read_text().startswith("# pretrained vs scratch")


def test_compare_errors(tmp_path, capsys):
    _write(tmp_path / "a", A[:2], ["x", "y"])
    _write(tmp_path / "b", B[:2], ["z", "w"])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "share no case" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    (tmp_path / "junk.csv").write_text("foo,bar\n1,2\n")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "junk.csv")]) == 2
    assert "not a per-case metrics CSV" in capsys.readouterr().err
