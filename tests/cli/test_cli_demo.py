"""``mambamim demo --quick`` end to end on CPU: every stage runs and the report is complete."""

from __future__ import annotations

import json
import math

from mambamim.cli.main import main
from mambamim.evaluation.metrics import MetricTable


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--quick", "--device", "cpu", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
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
