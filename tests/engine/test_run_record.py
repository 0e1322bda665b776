"""What a run records: config.yaml with absolute paths and the device used; metrics rows told apart
by phase; TensorBoard tags grouped under train/ and val/."""

from __future__ import annotations

import csv
import os

from mambamim.engine.config import FinetuneConfig, PretrainConfig
from mambamim.engine.logging_utils import MetricsWriter


def test_resolved_config_has_absolute_paths_and_the_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = FinetuneConfig(data="cache", out="runs/a", pretrained="pt/encoder.pt", val_cases="val.txt", device="auto")
    rec = cfg.resolved("cuda:0")
    assert rec.data == str(tmp_path / "cache") and rec.out == str(tmp_path / "runs" / "a")
    assert rec.pretrained == str(tmp_path / "pt" / "encoder.pt") and rec.val_cases == str(tmp_path / "val.txt")
    assert rec.device == "cuda:0" and cfg.device == "auto"  # a copy: the run's own config is unchanged
    assert PretrainConfig(data="c", out="o").resolved().resume is None  # unset paths stay unset
    rec.save_yaml(tmp_path / "config.yaml")
    again = FinetuneConfig.load_yaml(tmp_path / "config.yaml")
    assert again == rec and os.path.isabs(again.data)


def test_metrics_rows_carry_their_phase_and_tensorboard_groups_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path)
    w.log({"step": 1, "epoch": 0, "loss": 2.0}, prefix="train/", phase="train")
    w.log({"step": 1, "val_mean_dice": 0.5, "val_dice_liver": 0.7}, prefix="val/", phase="val")
    w.close()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["phase"] for r in rows] == ["train", "val"]
    assert rows[0]["val_mean_dice"] == "" and rows[1]["loss"] == ""
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "val/mean_dice", "val/dice_liver"}


def test_resume_compares_paths_as_absolute(tmp_path, monkeypatch):
    import pytest

    from mambamim.engine.run_folder import resolve_resume

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")  # only its presence is checked here
    PretrainConfig(data="cache", out="run").resolved("cpu").save_yaml(run / "config.yaml")
    cfg = PretrainConfig(data="cache", out="run", resume=str(run))
    assert resolve_resume(cfg, PretrainConfig, explicit={"data"}).data == str(tmp_path / "cache")
    with pytest.raises(ValueError, match="data"):
        resolve_resume(PretrainConfig(data="other", out="run", resume=str(run)), PretrainConfig, explicit={"data"})
