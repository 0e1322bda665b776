"""``mambamim compare RUN_A RUN_B``: per-class means of two evaluations and paired p-values.

Each run is an evaluation folder holding ``per_case.csv`` (as written by ``mambamim evaluate``)
or the CSV itself. Prints a table of per-class means over the shared cases with the paired
t-test and Wilcoxon signed-rank p-values, and saves it as ``comparison.md`` / ``comparison.json``.
"""

from __future__ import annotations

import argparse
import os

from mambamim.cli.cmd_predict import error


def _csv_path(run: str) -> str:
    if os.path.isdir(run):
        for candidate in (os.path.join(run, "per_case.csv"), os.path.join(run, "eval", "per_case.csv")):
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"no per_case.csv in {run} (run `mambamim evaluate` first)")
    if not os.path.exists(run):
        raise FileNotFoundError(f"no such evaluation: {run}")
    return run


def _name(run: str) -> str:
    path = os.path.abspath(run)
    if os.path.isfile(path):
        path = os.path.dirname(path)
    return os.path.basename(path) or run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="evaluation folder (with per_case.csv) or the CSV of run A")
    parser.add_argument("run_b", metavar="RUN_B", help="evaluation folder (with per_case.csv) or the CSV of run B")
    parser.add_argument("--out", default=None,
                        help="folder for comparison.md / comparison.json (default: RUN_B's folder)")
    parser.add_argument("--metrics", nargs="+", default=["dice", "hd95", "nsd"], choices=["dice", "hd95", "nsd"],
                        help="metrics to compare (default: all)")
    parser.add_argument("--name-a", default=None, help="label of run A in the table (default: its folder name)")
    parser.add_argument("--name-b", default=None, help="label of run B in the table (default: its folder name)")


def run(args: argparse.Namespace) -> int:
    from mambamim.evaluation.metrics import MetricTable
    from mambamim.evaluation.stats import compare_tables, comparison_markdown, save_comparison

    try:
        path_a, path_b = _csv_path(args.run_a), _csv_path(args.run_b)
        table_a, table_b = MetricTable.from_csv(path_a), MetricTable.from_csv(path_b)
        shared, results = compare_tables(table_a, table_b, metrics=args.metrics)
    except (FileNotFoundError, ValueError) as exc:
        return error("compare", str(exc))
    name_a = args.name_a or _name(args.run_a)
    name_b = args.name_b or _name(args.run_b)
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    out = args.out or os.path.dirname(os.path.abspath(path_b))
    md_path, json_path = save_comparison(results, shared, out, name_a, name_b)
    print(comparison_markdown(results, len(shared), name_a, name_b))
    print(f"saved {md_path} and {json_path}")
    return 0
