"""Paired statistics against scipy directly."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from mambamim.evaluation.metrics import MetricTable
from mambamim.evaluation.stats import compare_tables, comparison_markdown, paired_tests, save_comparison

A = [0.81, 0.74, 0.90, 0.66, 0.72, 0.85, 0.79]
B = [0.84, 0.79, 0.91, 0.71, 0.70, 0.88, 0.86]


def test_paired_tests_match_scipy():
    p_t, p_w = paired_tests(A, B)
    assert p_t == pytest.approx(sps.ttest_rel(A, B).pvalue, rel=1e-12)
    assert p_w == pytest.approx(sps.wilcoxon(A, B).pvalue, rel=1e-12)
    assert 0 < p_t < 0.05  # B is better on 6 of 7 cases


def test_paired_tests_degenerate():
    assert all(math.isnan(p) for p in paired_tests([0.5], [0.6]))
    assert all(math.isnan(p) for p in paired_tests([0.5, 0.6], [0.5, 0.6]))
    with pytest.raises(ValueError):
        paired_tests([1, 2], [1, 2, 3])


def _table(values, cases, extra=None):
    t = MetricTable(class_names=["liver", "spleen"])
    for i, (c, v) in enumerate(zip(cases, values)):
        spleen = extra[i] if extra is not None else math.nan
        t.add_case(c, {"liver": {"dice": v, "hd95": 10 * v, "nsd": v}, "spleen": {"dice": spleen}})
    return t


def test_compare_tables_shared_cases_and_nan_pairs(tmp_path):
    cases = [f"c{i}" for i in range(len(A))]
    ta = _table(A, cases, extra=[0.5, math.nan, 0.6, 0.7, 0.5, 0.4, 0.6])
    tb = _table(B + [0.1], cases + ["only_b"], extra=[0.6, 0.9, 0.7, 0.7, 0.6, 0.5, 0.5, 0.0])
    shared, res = compare_tables(ta, tb)
    assert shared == cases
    by = {(r.class_name, r.metric): r for r in res}
    liver = by[("liver", "dice")]
    assert liver.n == 7
    assert liver.mean_a == pytest.approx(sum(A) / 7) and liver.mean_b == pytest.approx(sum(B) / 7)
    assert liver.p_ttest == pytest.approx(sps.ttest_rel(A, B).pvalue)
    assert liver.p_wilcoxon == pytest.approx(sps.wilcoxon(A, B).pvalue)
    spleen = by[("spleen", "dice")]
    assert spleen.n == 6  # the NaN pair is dropped
    xa = [0.5, 0.6, 0.7, 0.5, 0.4, 0.6]
    xb = [0.6, 0.7, 0.7, 0.6, 0.5, 0.5]
    assert spleen.p_ttest == pytest.approx(sps.ttest_rel(xa, xb).pvalue)
    assert by[("spleen", "hd95")].n == 0
    md = comparison_markdown(res, len(shared), "scratch", "pretrained")
    assert "| liver | dice | 7 |" in md
    md_path, json_path = save_comparison(res, shared, tmp_path, "scratch", "pretrained")
    import json

    payload = json.load(open(json_path))
    assert payload["shared_cases"] == cases
    assert any(r["p_ttest"] is None for r in payload["results"])  # NaN -> null


def test_compare_no_shared_cases():
    ta = _table(A[:2], ["a", "b"])
    tb = _table(B[:2], ["c", "d"])
    with pytest.raises(ValueError, match="share no case"):
        compare_tables(ta, tb)
