"""Paired comparison of two evaluations (paper Tables 5-6 p-values).

Two runs scored on the same cases give paired samples per class and metric; we report
the per-class means of each run over the shared cases, the mean difference (B - A)
and the two-sided p-values of the paired t-test (:func:`scipy.stats.ttest_rel`) and of
the Wilcoxon signed-rank test (:func:`scipy.stats.wilcoxon`). A pair where either run
has NaN (class not scored) or a non-finite value is dropped for that class and metric.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

from mambamim.atomic import write_json_atomic, write_text_atomic
from mambamim.evaluation.metrics import METRICS, MetricTable, column_name

logger = logging.getLogger(__name__)


@dataclass
class PairedResult:
    """Comparison of one class and metric between runs A and B over ``n`` paired cases."""

    class_name: str
    metric: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    p_ttest: float
    p_wilcoxon: float


def paired_tests(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided p-values of the paired t-test and of the Wilcoxon signed-rank test.

    Args:
        a, b: paired samples of equal length (already free of NaN).

    Returns:
        ``(p_ttest, p_wilcoxon)``; NaN where a test is undefined (fewer than 2 pairs, or all
        differences zero, where both tests have nothing to test).
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        return math.nan, math.nan
    d = y - x
    if np.all(d == 0):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_t = float(sps.ttest_rel(x, y).pvalue)
        try:
            p_w = float(sps.wilcoxon(x, y).pvalue)
        except ValueError:
            p_w = math.nan
    return p_t, p_w


def compare_tables(
    a: MetricTable, b: MetricTable, metrics: Sequence[str] = METRICS
) -> tuple[list[str], list[PairedResult]]:
    """Paired comparison of two metric tables over their shared cases and classes.

    Args:
        a, b: per-case tables of run A and run B.
        metrics: which metrics to compare.

    Returns:
        ``(shared_case_ids, results)`` with one :class:`PairedResult` per (class, metric), classes
        in A's order followed by the overall ``mean`` row.

    Raises:
        ValueError: the two tables share no case, or no class.
    """
    rows_a = {str(r["case"]): r for r in a.rows}
    rows_b = {str(r["case"]): r for r in b.rows}
    shared = [c for c in rows_a if c in rows_b]
    if not shared:
        raise ValueError(
            "the two evaluations share no case: A has "
            f"{_preview(list(rows_a))}, B has {_preview(list(rows_b))}"
        )
    b_cols = {column_name(c) for c in b.class_names}
    classes = [c for c in a.class_names if column_name(c) in b_cols]
    if not classes:
        raise ValueError(f"the two evaluations share no class: A has {a.class_names}, B has {b.class_names}")
    if len(shared) < len(rows_a) or len(shared) < len(rows_b):
        logger.warning(
            "comparing on %d shared case(s) of %d (A) and %d (B)", len(shared), len(rows_a), len(rows_b)
        )
    results: list[PairedResult] = []
    for name in classes + ["mean"]:
        for m in metrics:
            if m not in METRICS:
                raise ValueError(f"unknown metric {m!r}; expected one of {METRICS}")
            key = f"{m}_{column_name(name)}"
            xs, ys = [], []
            for c in shared:
                x = float(rows_a[c].get(key, math.nan))
                y = float(rows_b[c].get(key, math.nan))
                if math.isfinite(x) and math.isfinite(y):
                    xs.append(x)
                    ys.append(y)
            p_t, p_w = paired_tests(xs, ys)
            mean_a = float(np.mean(xs)) if xs else math.nan
            mean_b = float(np.mean(ys)) if ys else math.nan
            results.append(PairedResult(name, m, len(xs), mean_a, mean_b, mean_b - mean_a, p_t, p_w))
    return shared, results


def _preview(ids: list[str], k: int = 5) -> str:
    if not ids:
        return "no cases"
    more = f" ... ({len(ids)} in all)" if len(ids) > k else ""
    return ", ".join(ids[:k]) + more


def _fmt(v: float, digits: int) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.{digits}f}"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def comparison_markdown(
    results: Sequence[PairedResult], num_shared: int, name_a: str = "A", name_b: str = "B"
) -> str:
    """Markdown table of a comparison: one line per class and metric."""
    lines = [
        f"Paired comparison over {num_shared} shared case(s); difference = {name_b} - {name_a}; "
        "two-sided p-values.",
        "",
        f"| class | metric | n | {name_a} | {name_b} | difference | t-test p | Wilcoxon p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        digits = 2 if r.metric == "hd95" else 4
        lines.append(
            f"| {r.class_name} | {r.metric} | {r.n} | {_fmt(r.mean_a, digits)} | {_fmt(r.mean_b, digits)} "
            f"| {_fmt(r.mean_diff, digits)} | {_fmt_p(r.p_ttest)} | {_fmt_p(r.p_wilcoxon)} |"
        )
    return "\n".join(lines) + "\n"


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def save_comparison(
    results: Sequence[PairedResult],
    shared: Sequence[str],
    out_dir: str | os.PathLike,
    name_a: str = "A",
    name_b: str = "B",
) -> tuple[str, str]:
    """Write ``comparison.md`` and ``comparison.json`` (NaN as null) into ``out_dir``; returns both paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, "comparison.md")
    json_path = os.path.join(out_dir, "comparison.json")
    payload = {
        "run_a": name_a,
        "run_b": name_b,
        "shared_cases": list(shared),
        "results": [{k: _json_safe(v) for k, v in asdict(r).items()} for r in results],
    }
    write_json_atomic(json_path, payload)
    write_text_atomic(md_path, f"# {name_b} vs {name_a}\n\n" + comparison_markdown(results, len(shared), name_a, name_b))
    return md_path, json_path
