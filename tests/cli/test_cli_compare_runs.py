"""``mambamim compare`` on fine-tuning run folders: RUN/eval*/per_case.csv, else evaluate with --data on the
same cases as the other side, else one line naming the exact ``mambamim evaluate`` command."""

from __future__ import annotations

import json
import shlex

import pytest

from mambamim.cli.main import main
from mambamim.evaluation.metrics import MetricTable

from _cli_toys import toy_info
from _eval_toys import make_cache6, make_run

SPLIT = {"train": ["case0", "case3"], "validation": ["case1", "case2"]}


@pytest.fixture(scope="module")
def cache6(tmp_path_factory):
    return make_cache6(tmp_path_factory.mktemp("cache6"))


@pytest.fixture
def toy6(toy_segmenter):
    toy_segmenter["info"] = toy_info(spacing=(6.0, 6.0, 6.0), roi=16)
    return toy_segmenter


def _write_eval(folder, cases, dice):
    t = MetricTable(class_names=["bright"])
    for c, d in zip(cases, dice):
        t.add_case(c, {"bright": {"dice": d, "hd95": 6.0, "nsd": d}})
    folder.mkdir(parents=True, exist_ok=True)
    t.to_csv(folder / "per_case.csv")


def test_compare_run_folders_with_evaluations(tmp_path, capsys):
    a = make_run(tmp_path / "scratch", SPLIT)
    b = make_run(tmp_path / "pretrained", SPLIT)
    _write_eval(a / "eval_val", ["case1", "case2"], [0.5, 0.6])
    _write_eval(b / "eval", ["case1", "case2"], [0.7, 0.9])
    assert main(["compare", str(a), str(b)]) == 0
    payload = json.loads((b / "eval" / "comparison.json").read_text())
    assert payload["shared_cases"] == ["case1", "case2"]
    dice = next(r for r in payload["results"] if r["class_name"] == "bright" and r["metric"] == "dice")
    assert dice["mean_a"] == pytest.approx(0.55) and dice["mean_b"] == pytest.approx(0.8)
    assert "scratch" in capsys.readouterr().out
    # two evaluations in one run: ambiguous, named
    _write_eval(a / "eval_test", ["case0"], [0.4])
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "several evaluations" in err and "eval_test" in err and "eval_val" in err


def test_compare_missing_evaluation_names_the_command(tmp_path, cache6, capsys):
    a = make_run(tmp_path / "a", SPLIT, data=cache6)
    b = make_run(tmp_path / "b", SPLIT, data=cache6)
    _write_eval(a / "eval", ["case1", "case2", "case3"], [0.5, 0.6, 0.7])
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(b) in err
    command = err[err.index("`") + 1:err.rindex("`")]
    # the same case list as A's evaluation, on the cache the run was trained on
    assert shlex.split(command) == ["mambamim", "evaluate", "--checkpoint", str(b), "--data", str(cache6),
                                    "--cases", "case1", "case2", "case3", "--out", str(b / "eval")]
    # neither evaluated: both commands, on their (equal) validation splits
    c = make_run(tmp_path / "c", SPLIT, data=cache6)
    assert main(["compare", str(b), str(c)]) == 2
    err = capsys.readouterr().err
    assert (f"mambamim evaluate --checkpoint {b} --data {cache6} --split val --out {b / 'eval'} && "
            f"mambamim evaluate --checkpoint {c} --data {cache6} --split val --out {c / 'eval'}") in err


def test_compare_evaluates_missing_runs_with_data(tmp_path, cache6, toy6, capsys):
    a = make_run(tmp_path / "a", SPLIT)
    b = make_run(tmp_path / "b", SPLIT)
    _write_eval(a / "eval", ["case0", "case2"], [0.5, 0.6])
    rc = main(["compare", str(a), str(b), "--data", str(cache6), "--device", "cpu", "--no-progress"])
    assert rc == 0
    tb = MetricTable.from_csv(b / "eval" / "per_case.csv")
    assert tb.case_ids == ["case0", "case2"]  # exactly A's cases
    assert tb.rows[0]["dice_bright"] == pytest.approx(1.0)  # the toy segments case0 exactly
    payload = json.loads((b / "eval" / "comparison.json").read_text())
    assert payload["shared_cases"] == ["case0", "case2"]
    capsys.readouterr()
    # neither evaluated: both on the shared validation cases; a second compare reuses them
    c = make_run(tmp_path / "c", SPLIT)
    d = make_run(tmp_path / "d", {"train": ["case0"], "validation": ["case1", "case2", "case3"]})
    assert main(["compare", str(c), str(d), "--data", str(cache6), "--device", "cpu", "--no-progress"]) == 0
    assert MetricTable.from_csv(c / "eval" / "per_case.csv").case_ids == ["case1", "case2"]
    assert MetricTable.from_csv(d / "eval" / "per_case.csv").case_ids == ["case1", "case2"]
    assert main(["compare", str(c), str(d)]) == 0
