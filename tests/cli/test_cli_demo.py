"""``mambamim demo --quick`` end to end on CPU, then every evaluation command on its real checkpoints."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from mambamim.cli.main import main
from mambamim.demo import DEMO_ORGANS
from mambamim.evaluation.metrics import MetricTable


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    rc = main(["demo", "--out", str(out), "--quick", "--device", "cpu", "--no-progress", "--repeats", "2"])
    assert rc == 0
    return out


def test_demo_quick_report(demo_out, capsys):
    out = demo_out
    report = (out / "report.md").read_text()
    for section in ("## What was run", "## Result", "## Pre-training", "## Fine-tuning", "## Timings"):
        assert section in report
    assert "no significant difference" in report  # 2 test cases: the Wilcoxon test cannot reach 0.05
    for png in ("reconstruction", "pretrain_loss", "finetune", "dice_per_class", "overlay"):
        path = out / "figures" / f"{png}.png"
        assert path.read_bytes()[:4] == b"\x89PNG", png
        assert f"figures/{png}.png" in report
    tables = {n: MetricTable.from_csv(out / f"eval_{n}" / "per_case.csv") for n in ("scratch", "pretrained")}
    meta = json.loads((out / "demo.json").read_text())
    ids = meta["cases"]
    test_ids = (out / "test_cases.txt").read_text().split()
    assert test_ids == ids["test"] and len(ids["unlabeled"]) == 2
    for t in tables.values():
        assert t.case_ids == test_ids
        assert len(t.class_names) == len(DEMO_ORGANS)  # the organs the demo labels
        assert all(0.0 <= r["dice_mean"] <= 1.0 for r in t.rows if not math.isnan(r["dice_mean"]))
    cmp = json.loads((out / "compare" / "comparison.json").read_text())
    assert cmp["shared_cases"] == test_ids
    for arm in ("scratch", "pretrained"):
        split = json.loads((out / f"finetune_{arm}" / "split.json").read_text())
        assert split["train"] == ids["train"] and split["validation"] == ids["val"]  # test cases never fine-tune
        assert (out / f"finetune_{arm}" / "checkpoints" / "best.pt").exists()  # validation picked a checkpoint
    pre_cfg = (out / "pretrain" / "config.yaml").read_text()
    assert all(t not in pre_cfg for t in test_ids)  # nor pre-train
    load = json.loads((out / "finetune_pretrained" / "encoder_load_report.json").read_text())
    assert load["summary"].startswith("loaded 84 of 84 encoder tensors")
    assert meta["seconds"]["total"] > 0
    # --repeats 2: a second fine-tuning pair (seed 1, same data and encoder), tested over runs
    runs = meta["over_runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["scratch"] == pytest.approx(meta["mean_dice"]["scratch"])
    for arm in ("scratch", "pretrained"):
        again = out / "repeats" / "seed1" / f"finetune_{arm}"
        assert (again / "checkpoints" / "best.pt").exists() and "seed: 1" in (again / "config.yaml").read_text()
        assert (out / "repeats" / "seed1" / f"eval_{arm}" / "per_case.csv").exists()
    assert "Over 2 fine-tuning runs of each arm (seeds 0-1)" in report and "| fine-tuning seed |" in report
    assert "2 runs cannot give a Wilcoxon p below 0.5" in report and "This is one draw" not in report


def test_verdict_over_runs_in_words():
    from mambamim.demo import verdict_over_runs

    rows = [{"seed": k, "scratch": 0.5 + 0.01 * k, "pretrained": 0.55 + 0.01 * k + 0.001 * k} for k in range(6)]
    text = verdict_over_runs(rows)
    assert "pretrained ahead in 6 of 6 runs" in text and "pretrained is significantly better" in text
    rows[0]["pretrained"], rows[1]["pretrained"] = 0.3, 0.2  # two runs go the other way
    assert "No significant difference over runs" in verdict_over_runs(rows)


def test_demo_settings_from_text():
    from mambamim.demo import DemoSettings

    s = DemoSettings()
    s.set_from_text("lr_finetune=0.01")
    s.set_from_text("num-train=5")
    assert s.lr_finetune == 0.01 and s.num_train == 5
    for bad in ("lr_finetune=abc", "nope=1", "crop"):
        with pytest.raises(ValueError):
            s.set_from_text(bad)


def test_commands_on_real_checkpoints(demo_out, tmp_path, capsys):
    out = demo_out
    ft = out / "finetune_pretrained"
    test_id = (out / "test_cases.txt").read_text().split()[0]
    raw_image = out / "raw" / "imagesTr" / f"{test_id}.nii.gz"
    # predict: label map in the input's own grid
    rc = main(["predict", "--checkpoint", str(ft), "--input", str(raw_image), "--output", str(tmp_path / "pred"),
               "--device", "cpu", "--no-progress", "--overlap", "0.25"])
    assert rc == 0
    src = nib.load(raw_image)
    seg = nib.load(tmp_path / "pred" / f"{test_id}_seg.nii.gz")
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    assert np.asarray(seg.dataobj).max() <= 13
    # evaluate on the demo's cache reproduces the demo's own evaluation
    rc = main(["evaluate", "--checkpoint", str(ft / "checkpoints" / "last.pt"), "--data", str(out / "cache"),
               "--out", str(tmp_path / "ev"), "--cases", test_id, "--overlap", "0.25", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    mine = MetricTable.from_csv(tmp_path / "ev" / "per_case.csv").rows[0]
    demo = MetricTable.from_csv(out / "eval_pretrained" / "per_case.csv").rows[0]
    assert mine["dice_mean"] == pytest.approx(demo["dice_mean"], abs=1e-6)
    # reconstruct from the pre-training run
    png = tmp_path / "fig9.png"
    rc = main(["reconstruct", "--checkpoint", str(out / "pretrain"), "--input", str(raw_image), "--out", str(png),
               "--seed", "1", "--device", "cpu"])
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    # compare the two evaluations
    rc = main(["compare", str(out / "eval_scratch"), str(out / "eval_pretrained"), "--out", str(tmp_path / "cmp")])
    assert rc == 0 and (tmp_path / "cmp" / "comparison.md").exists()
    # a fine-tuning checkpoint is not a pre-training one, and vice versa: clear errors
    capsys.readouterr()
    assert main(["reconstruct", "--checkpoint", str(ft / "checkpoints" / "last.pt"), "--input", str(raw_image),
                 "--out", str(png)]) == 2
    assert "not a mambamim pre-training checkpoint" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(out / "pretrain" / "checkpoints" / "last.pt"), "--input",
                 str(raw_image), "--output", str(tmp_path / "p2")]) == 2
    assert "model configuration" in capsys.readouterr().err
