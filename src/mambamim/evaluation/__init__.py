"""Evaluation: per-case, per-class Dice / HD95 / surface Dice and paired statistics between runs."""

from mambamim.evaluation.metrics import (
    METRICS,
    MetricTable,
    binary_metrics,
    case_metrics,
    column_name,
    default_nsd_tolerance,
    evaluate_cases,
)
from mambamim.evaluation.report import evaluate_on_cache, write_evaluation
from mambamim.evaluation.stats import PairedResult, compare_tables, comparison_markdown, paired_tests, save_comparison

__all__ = [
    "METRICS",
    "MetricTable",
    "binary_metrics",
    "case_metrics",
    "column_name",
    "default_nsd_tolerance",
    "evaluate_cases",
    "PairedResult",
    "compare_tables",
    "comparison_markdown",
    "paired_tests",
    "save_comparison",
    "evaluate_on_cache",
    "write_evaluation",
]
