"""``mambamim compare RUN_A RUN_B``: per-class means of two evaluations and paired p-values.

Each of RUN_A / RUN_B is an evaluation folder holding ``per_case.csv`` (as written by
``mambamim evaluate``), the CSV itself, or a fine-tuning run folder. For a run folder the
evaluation is ``RUN/eval*/per_case.csv``; when it has none, ``--data CACHE`` evaluates the run's
checkpoint into ``RUN/eval`` on the same cases as the other side (its evaluation's cases, else the
runs' shared validation cases), and without ``--data`` the command fails naming the exact
``mambamim evaluate`` command to run. Prints a table of per-class means over the shared cases with
the paired t-test and Wilcoxon signed-rank p-values, and saves it as ``comparison.md`` /
``comparison.json``. The command parses its arguments, calls :func:`mambamim.api.compare_runs` and
prints its result.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from mambamim.cli.cmd_predict import error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A",
                        help="evaluation folder (with per_case.csv), its CSV, or fine-tuning run folder of run A")
    parser.add_argument("run_b", metavar="RUN_B",
                        help="evaluation folder (with per_case.csv), its CSV, or fine-tuning run folder of run B")
    parser.add_argument("--data", default=None, metavar="CACHE",
                        help="evaluate a run folder that has no RUN/eval*/per_case.csv on this cache (or labeled "
                             "raw data) into RUN/eval, on the same cases as the other side")
    parser.add_argument("--out", default=None,
                        help="folder for comparison.md / comparison.json (default: RUN_B's evaluation folder)")
    parser.add_argument("--metrics", nargs="+", default=["dice", "hd95", "nsd"], choices=["dice", "hd95", "nsd"],
                        help="metrics to compare (default: all)")
    parser.add_argument("--name-a", default=None, help="label of run A in the table (default: its folder name)")
    parser.add_argument("--name-b", default=None, help="label of run B in the table (default: its folder name)")
    parser.add_argument("--device", default="auto", help="device of the evaluations --data runs (default: auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars in the evaluations --data runs")


def run(args: argparse.Namespace) -> int:
    from mambamim.api import EvaluationFailed, compare_runs
    from mambamim.cli.cmd_evaluate import print_result, print_start
    from mambamim.evaluation.stats import comparison_markdown

    def announce(run: str, argv: list[str]) -> None:
        print(f"{run} has no evaluation: mambamim evaluate {shlex.join(argv)}", file=sys.stderr)

    try:
        res = compare_runs(args.run_a, args.run_b, data=args.data, out_dir=args.out, metrics=args.metrics,
                           name_a=args.name_a, name_b=args.name_b, device=args.device, progress=args.progress,
                           log_problems=False, on_evaluate=announce, on_evaluation_start=print_start,
                           on_evaluated=print_result)
    except EvaluationFailed as exc:
        return error("evaluate", str(exc))
    except (FileNotFoundError, ValueError) as exc:
        return error("compare", str(exc))
    print(comparison_markdown(res.results, len(res.shared), res.name_a, res.name_b))
    print(f"saved {res.markdown_path} and {res.json_path}")
    return 0
