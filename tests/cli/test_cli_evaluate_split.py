"""``mambamim evaluate --split val|train`` evaluates exactly the fine-tuning run's split; the surface-Dice
tolerance follows the cache's voxel size; the start line says what it does in words."""

from __future__ import annotations

import json

import pytest
import torch

from mambamim.cli.main import main
from mambamim.evaluation.metrics import MetricTable

from _cli_toys import toy_info
from _eval_toys import make_cache6, make_run


@pytest.fixture(scope="module")
def cache6(tmp_path_factory):
    """A prepared cache of 4 labeled cases on 6 mm voxels."""
    return make_cache6(tmp_path_factory.mktemp("cache6"))


def _run(tmp_path, split=None, checkpoint_split=None):
    return make_run(tmp_path / "run", split, checkpoint_split)


def _evaluate(ckpt, cache, out, *extra):
    return main(["evaluate", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(out), "--device", "cpu",
                 "--no-progress", *extra])


def test_split_val_and_train_from_split_json(tmp_path, cache6, toy_segmenter, capsys):
    toy_segmenter["info"] = toy_info(spacing=(6.0, 6.0, 6.0), roi=16)
    run = _run(tmp_path, {"train": ["case0", "case3"], "validation": ["case2", "case1"]})
    assert _evaluate(run / "checkpoints" / "best.pt", cache6, tmp_path / "ev", "--split", "val") == 0
    err = capsys.readouterr().err
    assert MetricTable.from_csv(tmp_path / "ev" / "per_case.csv").case_ids == ["case1", "case2"]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["split"] == "val" and summary["split_source"].endswith("split.json")
    # the NSD tolerance is the mean voxel size (6 mm): one voxel off still matches
    assert summary["nsd_tolerance_mm"] == 6.0
    assert "surface Dice (6 mm)" in (tmp_path / "ev" / "summary.md").read_text()
    t = MetricTable.from_csv(tmp_path / "ev" / "per_case.csv")
    assert t.rows[0]["dice_bright"] < 1.0 and t.rows[0]["nsd_bright"] == pytest.approx(1.0)
    # the start line in words
    assert "2 case(s)" in err and "validation cases" in err
    assert "precision fp32 (no autocast)" in err and "1 process on cpu" in err and " x1" not in err
    assert "surface-Dice tolerance 6 mm (the cache's mean voxel size)" in err
    # the run folder itself, --split train
    assert _evaluate(run, cache6, tmp_path / "tr", "--split", "train", "--nsd-tolerance", "1") == 0
    tr = MetricTable.from_csv(tmp_path / "tr" / "per_case.csv")
    assert tr.case_ids == ["case0", "case3"]
    assert json.loads((tmp_path / "tr" / "summary.json").read_text())["nsd_tolerance_mm"] == 1.0
    assert tr.rows[1]["nsd_bright"] < 0.9  # case3 is one voxel off: 1 mm does not reach it
    # --cases narrows the split, and must be in it
    assert _evaluate(run, cache6, tmp_path / "one", "--split", "val", "--cases", "case2") == 0
    assert MetricTable.from_csv(tmp_path / "one" / "per_case.csv").case_ids == ["case2"]
    capsys.readouterr()
    assert _evaluate(run, cache6, tmp_path / "bad", "--split", "val", "--cases", "case0") == 2
    assert "not validation cases of the run" in capsys.readouterr().err


def test_split_from_checkpoint_and_errors(tmp_path, cache6, toy_segmenter, capsys):
    toy_segmenter["info"] = toy_info(spacing=(6.0, 6.0, 6.0), roi=16)
    run = _run(tmp_path, None, checkpoint_split={"train": ["case1", "case2", "case3"], "validation": ["case0"]})
    assert _evaluate(run / "checkpoints" / "best.pt", cache6, tmp_path / "ev", "--split", "validation") == 0
    assert MetricTable.from_csv(tmp_path / "ev" / "per_case.csv").case_ids == ["case0"]
    capsys.readouterr()
    # a checkpoint outside a run folder, recording no split: one clear line
    lone = tmp_path / "lone" / "model.pt"
    lone.parent.mkdir()
    torch.save({"x": 1}, lone)
    assert _evaluate(lone, cache6, tmp_path / "o", "--split", "val") == 2
    err = capsys.readouterr().err
    assert "not inside a fine-tuning run folder with a split" in err and str(lone.parent / "split.json") in err
    assert len(err.strip().splitlines()) == 1
    # a split naming cases the cache does not have
    other = _run(tmp_path / "o2", {"train": ["case0"], "validation": ["case1", "ghost"]})
    assert _evaluate(other, cache6, tmp_path / "o3", "--split", "val") == 2
    err = capsys.readouterr().err
    assert "ghost" in err and "is --data the data the run was trained on" in err
    # no validation (fold -1)
    novl = _run(tmp_path / "o4", {"how": "no validation (fold -1)", "train": ["case0"], "validation": []})
    assert _evaluate(novl, cache6, tmp_path / "o5", "--split", "val") == 2
    assert "has no validation cases" in capsys.readouterr().err
    # other split names still select the cache's marked cases (none marked here)
    assert _evaluate(run, cache6, tmp_path / "o6", "--split", "test") == 2
    assert "no labeled case" in capsys.readouterr().err
