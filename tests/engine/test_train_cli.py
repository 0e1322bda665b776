"""``mambamim pretrain`` and ``mambamim finetune`` end to end on tiny synthetic data with the real
tiny networks: run folder contents, CLI resume, encoder transfer, checkpoint self-description."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from engine_standins import make_tiny_cache
from mambamim.cli.main import main
from mambamim.engine.checkpoint import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("data"))


COMMON = ["--size", "tiny", "--crop", "32", "--batch-size", "1", "--num-crops", "1", "--workers", "0",
          "--device", "cpu", "--no-progress", "--log-every", "1"]


def test_pretrain_then_finetune_cli(tiny_cache, tmp_path, capsys):
    run = tmp_path / "pre"
    args = ["pretrain", "--data", str(tiny_cache), "--out", str(run), *COMMON, "--steps", "2", "--warmup-steps", "1",
            "--decoder-width", "16", "--vis-every", "1", "--stop-after", "1", "--sparse-levels", "2"]
    assert main(args) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["sparse_levels"] == 2
    assert main(["pretrain", "--resume", str(run), "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    for name in ("config.yaml", "log.txt", "metrics.csv", "encoder.pt", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "reconstructions").glob("*.png"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["kind"] == "pretrain" and cfg["decoder_width"] == 16 and cfg["steps"] == 2 and cfg["size"] == "tiny"
    assert cfg["sparse_levels"] == 2  # --resume keeps the saved options that its command line does not give
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert "peak_mem_gib" not in rows[0]  # GPU memory columns come only on CUDA
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    log = (run / "log.txt").read_text()
    assert "resumed" in log and "pre-training finished" in log
    enc = load_checkpoint(run / "encoder.pt")
    assert enc["format"] == "mambamim-encoder" and enc["model"]["name"] == "hymamba" and enc["step"] == 2
    assert enc["preprocessing"]["spacing"] == [8.0, 8.0, 8.0]
    # the run's checkpoints rebuild exactly what was trained (spec saved by the trainer)
    from mambamim.engine.inference import load_pretrained_encoder, load_pretrainer

    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert enc["pretrainer_spec"] == last["pretrainer_spec"]
    assert last["pretrainer_spec"]["kwargs"]["decoder_width"] == 16
    assert last["pretrainer_spec"]["kwargs"]["sparse_levels"] == 2
    rebuilt, _ = load_pretrainer(run, device="cpu")
    assert rebuilt.sparse_levels == 2
    for key, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, last["pretrainer"][key], rtol=0, atol=0, msg=key)
    encoder = load_pretrained_encoder(run / "encoder.pt")
    assert encoder.state_dict().keys() == enc["encoder"].keys()

    ft = tmp_path / "ft"
    assert main(["finetune", "--data", str(tiny_cache), "--out", str(ft), *COMMON, "--pretrained", str(run),
                 "--iterations", "1", "--val-every", "1", "--fold", "0", "--num-folds", "3"]) == 0
    for name in ("config.yaml", "log.txt", "metrics.csv", "split.json", "encoder_load_report.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (ft / name).is_file(), name
    report = json.loads((ft / "encoder_load_report.json").read_text())
    assert report["loaded"] > 0 and not report["missing"] and not report["unexpected"] and not report["mismatched"]
    # Every encoder tensor, the skip blocks included, came from pre-training, and the log says so.
    assert report["loaded"] == report["total"] and report["loaded_parameters"] == report["total_parameters"]
    assert report["summary"].startswith(f"loaded {report['total']} of {report['total']} encoder tensors")
    assert any(k.startswith("skip_blocks.") for k in enc["encoder"]) and not report["not_loaded_groups"]
    assert report["summary"] in (ft / "log.txt").read_text()
    assert load_checkpoint(ft / "checkpoints" / "best.pt")["encoder_load"]["summary"] == report["summary"]
    split = json.loads((ft / "split.json").read_text())
    assert len(split["validation"]) == 1 and len(split["train"]) == 2
    assert not set(split["train"]) & set(split["validation"])
    rows = list(csv.DictReader((ft / "metrics.csv").open()))
    val = [r for r in rows if r.get("val_mean_dice")]
    assert len(val) == 1 and 0.0 <= float(val[0]["val_mean_dice"]) <= 1.0 and "val_dice_liver" in rows[0]
    # the fine-tuned checkpoint describes itself
    model, info = model_from_checkpoint(ft)
    assert info["class_names"][0] == "background" and info["num_classes"] == 14
    assert info["preprocessing"]["spacing"] == [8.0, 8.0, 8.0] and info["roi_size"] == [32, 32, 32]
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)
    # the pre-trained encoder was really loaded (before fine-tuning moved it a little)
    best = load_checkpoint(ft / "checkpoints" / "best.pt")
    assert "optimizer" not in best and best["best_step"] == 1
    capsys.readouterr()


def test_finetune_refuses_mismatched_encoder(tiny_cache, tmp_path, capsys):
    from mambamim.engine.checkpoint import save_checkpoint
    from mambamim.models import create_model

    enc = create_model("vim_unetr", size="tiny", num_classes=14).encoder.state_dict()
    save_checkpoint(tmp_path / "encoder.pt", {"format": "mambamim-encoder", "encoder": enc,
                                              "model": {"name": "vim_unetr", "kwargs": {"size": "tiny"}}})
    rc = main(["finetune", "--data", str(tiny_cache), "--out", str(tmp_path / "ft"), *COMMON,
               "--pretrained", str(tmp_path / "encoder.pt"), "--iterations", "1", "--fold", "-1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "pre-trained for 'vim_unetr'" in err and "--allow-partial" in err and "missing in checkpoint" in err
    assert not (tmp_path / "ft" / "checkpoints" / "last.pt").exists()


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "x")]) == 2
    assert "--data and --out are required" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--batch-size", "6"]) == 1
    assert "multiple of num_crops" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(tmp_path / "nothing")]) == 1
    assert "config.yaml" in capsys.readouterr().err


def test_an_encoder_without_skip_blocks_is_refused_unless_partial(tiny_cache, tmp_path, capsys):
    from mambamim.engine.checkpoint import save_checkpoint

    run = tmp_path / "pre"
    assert main(["pretrain", "--data", str(tiny_cache), "--out", str(run), *COMMON, "--steps", "1",
                 "--warmup-steps", "0", "--decoder-width", "16", "--vis-every", "0"]) == 0
    old = load_checkpoint(run / "encoder.pt")
    old["encoder"] = {k: v for k, v in old["encoder"].items() if not k.startswith("skip_blocks.")}
    save_checkpoint(tmp_path / "old_encoder.pt", old)  # what an encoder.pt from before this version holds
    args = ["finetune", "--data", str(tiny_cache), *COMMON, "--pretrained", str(tmp_path / "old_encoder.pt"),
            "--iterations", "1", "--val-every", "0", "--fold", "0", "--num-folds", "3"]
    assert main([*args, "--out", str(tmp_path / "refused")]) != 0
    err = capsys.readouterr().err
    assert "not loaded: skip_blocks.0, skip_blocks.1, skip_blocks.2, skip_blocks.3" in err
    assert main([*args, "--out", str(tmp_path / "partial"), "--allow-partial"]) == 0
    report = json.loads((tmp_path / "partial" / "encoder_load_report.json").read_text())
    assert report["not_loaded_groups"] == ["skip_blocks.0", "skip_blocks.1", "skip_blocks.2", "skip_blocks.3"]
    assert report["loaded"] < report["total"]


def test_resuming_a_run_of_an_older_layout_is_a_named_error(tiny_cache, tmp_path, capsys):
    from mambamim.engine.checkpoint import save_checkpoint

    run = tmp_path / "pre"
    assert main(["pretrain", "--data", str(tiny_cache), "--out", str(run), *COMMON, "--steps", "2",
                 "--warmup-steps", "0", "--decoder-width", "16", "--vis-every", "0", "--stop-after", "1"]) == 0
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    last["pretrainer"] = {k: v for k, v in last["pretrainer"].items() if ".skip_blocks." not in k}
    save_checkpoint(run / "checkpoints" / "last.pt", last)
    assert main(["pretrain", "--resume", str(run), "--device", "cpu", "--workers", "0", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "last.pt" in err and "Traceback" not in err


def test_finetune_loads_a_converted_authors_checkpoint_in_full(tiny_cache, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from authors_reference import random_authors_state

    torch.save(random_authors_state(), tmp_path / "authors.pth")
    assert main(["convert", "authors", str(tmp_path / "authors.pth"), str(tmp_path / "encoder.pt")]) == 0
    args = [a for a in COMMON if a not in ("--size", "tiny")]
    ft = tmp_path / "ft"
    assert main(["finetune", "--data", str(tiny_cache), "--out", str(ft), *args, "--arch", "authors",
                 "--pretrained", str(tmp_path / "encoder.pt"), "--iterations", "1", "--val-every", "0",
                 "--fold", "0", "--num-folds", "3"]) == 0
    report = json.loads((ft / "encoder_load_report.json").read_text())
    assert report["loaded"] == report["total"] == 166 and report["loaded_parameters"] == 22_326_016
