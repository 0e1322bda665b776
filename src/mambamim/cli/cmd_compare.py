"""``mambamim compare RUN_A RUN_B``: per-class means of two evaluations and paired p-values.

Each of RUN_A / RUN_B is an evaluation folder holding ``per_case.csv`` (as written by
``mambamim evaluate``), the CSV itself, or a fine-tuning run folder. For a run folder the
evaluation is ``RUN/eval*/per_case.csv``; when it has none, ``--data CACHE`` evaluates the run's
checkpoint into ``RUN/eval`` on the same cases as the other side (its evaluation's cases, else the
runs' shared validation cases), and without ``--data`` the command fails naming the exact
``mambamim evaluate`` command to run. Prints a table of per-class means over the shared cases with
the paired t-test and Wilcoxon signed-rank p-values, and saves it as ``comparison.md`` /
``comparison.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys

from mambamim.cli.cmd_predict import error


class _Missing(Exception):
    """A run folder without an evaluation."""


def _is_run(folder: str) -> bool:
    """A fine-tuning (or any training) run folder: it has a checkpoints/ folder, split.json or config.yaml."""
    return any(os.path.exists(os.path.join(folder, n)) for n in ("checkpoints", "split.json", "config.yaml"))


def _csv_path(run: str) -> str:
    """The per_case.csv of an evaluation folder, a CSV, or a run folder's single RUN/eval*/per_case.csv.

    Raises:
        _Missing: ``run`` is a run folder without an evaluation.
        FileNotFoundError, ValueError: nothing to compare at ``run``.
    """
    if os.path.isdir(run):
        direct = os.path.join(run, "per_case.csv")
        if os.path.isfile(direct):
            return direct
        found = sorted(glob.glob(os.path.join(glob.escape(run), "eval*", "per_case.csv")))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(os.path.basename(os.path.dirname(f)) for f in found)
            raise ValueError(f"{run} holds several evaluations ({names}): give the one to compare, "
                             f"e.g. {os.path.dirname(found[0])}")
        if _is_run(run):
            raise _Missing(run)
        raise FileNotFoundError(f"no per_case.csv in {run} (not an evaluation folder nor a fine-tuning run)")
    if not os.path.exists(run):
        raise FileNotFoundError(f"no such evaluation: {run}")
    return run


def _name(run: str) -> str:
    path = os.path.abspath(run)
    if os.path.isfile(path):
        path = os.path.dirname(path)
    return os.path.basename(path) or run


def _validation(run: str) -> list[str] | None:
    """The validation case ids of a run (RUN/split.json), or None."""
    try:
        with open(os.path.join(run, "split.json")) as f:
            ids = json.load(f).get("validation")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(i) for i in ids] if isinstance(ids, list) else None


def _run_data(run: str) -> str:
    """The data a run was trained on: RUN/cache when the run prepared one, else config.yaml's ``data``,
    else the placeholder CACHE."""
    from mambamim.engine.config import find_cache

    if find_cache(os.path.join(run, "cache")) is not None:
        return os.path.join(run, "cache")
    try:
        import yaml

        with open(os.path.join(run, "config.yaml")) as f:
            data = (yaml.safe_load(f) or {}).get("data")
    except (OSError, ValueError, AttributeError):
        data = None
    return str(data) if data else "CACHE"


def _eval_out(run: str) -> str:
    """RUN/eval, or RUN/eval_2, ... when RUN/eval already holds something."""
    out, k = os.path.join(run, "eval"), 1
    while os.path.exists(out) and os.listdir(out):
        k += 1
        out = os.path.join(run, f"eval_{k}")
    return out


def _evaluate_argv(run: str, data: str, cases: list[str] | None, out: str) -> list[str]:
    """``mambamim evaluate`` arguments for ``run`` on ``cases`` (``--split val`` when they are its
    validation cases)."""
    argv = ["--checkpoint", run, "--data", data]
    if cases is None or sorted(cases) == sorted(_validation(run) or []):
        argv += ["--split", "val"]
    else:
        argv += ["--cases", *cases]
    return argv + ["--out", out]


def _shared_cases(runs: list[str], tables: list) -> list[str] | None:
    """The case list the missing evaluations use: the cases of the evaluation present, else the
    validation cases the runs share (None: every run's own --split val).

    Raises:
        ValueError: the runs share no validation case.
    """
    known = [t for t in tables if t is not None]
    if known:
        return list(known[0].case_ids)
    vals = [_validation(r) for r in runs]
    if any(v is None for v in vals) or len({tuple(sorted(v)) for v in vals}) == 1:
        return None
    shared = [c for c in vals[0] if all(c in v for v in vals[1:])]
    if not shared:
        raise ValueError(f"{runs[0]} and {runs[1]} share no validation case (RUN/split.json): evaluate both on "
                         "the same held-out cases with `mambamim evaluate --cases ...` and compare those folders")
    return shared


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


def _resolve(args: argparse.Namespace) -> tuple[str, str] | int:
    """The two per_case.csv paths, evaluating missing ones with --data; an exit status on failure."""
    from mambamim.evaluation.metrics import MetricTable

    runs = [args.run_a, args.run_b]
    paths: list[str | None] = []
    for run in runs:
        try:
            paths.append(_csv_path(run))
        except _Missing:
            paths.append(None)
    if all(p is not None for p in paths):
        return paths[0], paths[1]  # type: ignore[return-value]
    tables = [MetricTable.from_csv(p) if p is not None else None for p in paths]
    cases = _shared_cases(runs, tables)
    missing = [r for r, p in zip(runs, paths) if p is None]
    if args.data is None:
        commands = [shlex.join(["mambamim", "evaluate",
                                *_evaluate_argv(r, _run_data(r), cases, os.path.join(r, "eval"))]) for r in missing]
        what = " and ".join(missing)
        return error("compare", f"no evaluation in {what} (no RUN/eval*/per_case.csv): run `{' && '.join(commands)}` "
                                f"first, or pass --data CACHE to evaluate {'it' if len(missing) == 1 else 'them'} here")
    from mambamim.cli import cmd_evaluate

    for k, run in enumerate(runs):
        if paths[k] is not None:
            continue
        argv = _evaluate_argv(run, args.data, cases, _eval_out(run)) + ["--device", args.device]
        if not args.progress:
            argv.append("--no-progress")
        print(f"{run} has no evaluation: mambamim evaluate {shlex.join(argv)}", file=sys.stderr)
        parser = argparse.ArgumentParser(prog="mambamim evaluate")
        cmd_evaluate.add_arguments(parser)
        rc = cmd_evaluate.run(parser.parse_args(argv))
        if rc != 0:
            return rc
        paths[k] = os.path.join(argv[argv.index("--out") + 1], "per_case.csv")
    return paths[0], paths[1]  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from mambamim.evaluation.metrics import MetricTable
    from mambamim.evaluation.stats import compare_tables, comparison_markdown, save_comparison

    try:
        resolved = _resolve(args)
        if isinstance(resolved, int):
            return resolved
        path_a, path_b = resolved
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
