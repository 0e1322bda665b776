"""``mambamim demo --quick`` end to end on CPU, then every evaluation command on its real checkpoints."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from mambamim.cli.main import main
from mambamim.evaluation.metrics import MetricTable


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    rc = main(["demo", "--out", str(out), "--quick", "--device", "cpu", "--no-progress"])
    assert rc == 0
    return out


def test_demo_quick_report(demo_out, capsys):
    out = demo_out
    report = (out / "report.md").read_text()
    for section in ("## Mean over classes", "## Paired comparison", "## Pre-training", "## Fine-tuning",
                    "## Evaluation", "## Timings"):
        assert section in report
    for png in ("reconstruction", "pretrain_loss", "finetune_loss", "dice_per_class", "overlay"):
        path = out / "figures" / f"{png}.png"
        assert path.read_bytes()[:4] == b"\x89PNG", png
        assert f"figures/{png}.png" in report
    tables = {n: MetricTable.from_csv(out / f"eval_{n}" / "per_case.csv") for n in ("scratch", "pretrained")}
    test_ids = (out / "test_cases.txt").read_text().split()
    for t in tables.values():
        assert t.case_ids == test_ids
        assert len(t.class_names) == 13
        assert all(0.0 <= r["dice_mean"] <= 1.0 for r in t.rows if not math.isnan(r["dice_mean"]))
    cmp = json.loads((out / "compare" / "comparison.json").read_text())
    assert cmp["shared_cases"] == test_ids
    split = json.loads((out / "finetune_pretrained" / "split.json").read_text())
    assert not set(split["train"]) & set(test_ids)  # held-out cases never fine-tune
    assert (out / "finetune_pretrained" / "encoder_load_report.json").exists()
    meta = json.loads((out / "demo.json").read_text())
    assert meta["seconds"]["total"] > 0


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
