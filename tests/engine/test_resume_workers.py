"""Exact resume with the real cache loader and worker processes (issue 18.2): crops and augmentation are a
function of (seed, epoch, index), so a run stopped mid-epoch and resumed with ``workers > 0`` equals an
uninterrupted one bit for bit; ``--resume`` keeps the run's saved options; damaged or missing ``last.pt``
falls back to the newest valid epoch checkpoint."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from engine_standins import TinyPretrainer, TinySegNet
from mambamim.engine.checkpoint import load_checkpoint
from mambamim.engine.config import FinetuneConfig, PretrainConfig


def write_cache(root, n=3, shape=(40, 36, 34), labeled=True):
    """A real cache of ``n`` random volumes (float32 (1, X, Y, Z) in [0, 1], labels with two classes)."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        d = root / "cases" / f"c{i}"
        d.mkdir(parents=True)
        image = rng.random((1, *shape), dtype=np.float32)
        np.save(d / "image.npy", image)
        entry = {"id": f"c{i}", "image": f"cases/c{i}/image.npy", "label": None, "meta": f"cases/c{i}/meta.json",
                 "shape": [1, *shape]}
        if labeled:
            label = (image[0] > 0.6).astype(np.uint8) + (image[0] > 0.9)
            np.save(d / "label.npy", label)
            entry["label"] = f"cases/c{i}/label.npy"
        (d / "meta.json").write_text(json.dumps({"id": f"c{i}"}))
        cases.append(entry)
    (root / "dataset.json").write_text(json.dumps({
        "format": "mambamim-cache", "version": 1, "preprocessing": {"spacing": [1.5, 1.5, 1.5]},
        "labels": {"0": "background", "1": "a", "2": "b"} if labeled else None, "cases": cases}))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_models(monkeypatch):
    """Stand-in networks (fast); the data path is the real one (cache, crops, augmentation, workers)."""
    from mambamim.engine import finetune_loop, pretrain_loop

    monkeypatch.setattr(pretrain_loop.PretrainTrainer, "build_model",
                        lambda self: TinyPretrainer(self.config.in_channels, self.config.mask_ratio))
    monkeypatch.setattr(pretrain_loop.PretrainTrainer, "preview_volume", lambda self: None)
    monkeypatch.setattr(finetune_loop, "_make_model",
                        lambda spec: TinySegNet(spec["kwargs"]["in_channels"], spec["kwargs"]["num_classes"]))


def _pre(cache, out, **kw):
    # 3 volumes, 1 per step: 3 steps an epoch
    base = dict(data=str(cache), out=str(out), crop=16, batch_size=2, num_crops=2, steps=7, warmup_steps=2,
                workers=2, device="cpu", progress=False, vis_every=0, log_every=1, save_every=1, lr=1e-2, seed=3)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run):
    return [(int(r["step"]), r["loss"]) for r in csv.DictReader((run / "metrics.csv").open())]


def _assert_same_weights(a, b, key):
    wa, wb = load_checkpoint(a / "checkpoints" / "last.pt")[key], load_checkpoint(b / "checkpoints" / "last.pt")[key]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def full_pretrain(cache, tmp_path_factory):
    from mambamim.engine import pretrain_loop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_loop.PretrainTrainer, "build_model",
                   lambda self: TinyPretrainer(self.config.in_channels, self.config.mask_ratio))
        mp.setattr(pretrain_loop.PretrainTrainer, "preview_volume", lambda self: None)
        return pretrain_loop.pretrain(_pre(cache, tmp_path_factory.mktemp("full") / "run"))


def test_pretrain_resume_with_workers_is_bit_exact(cache, tmp_path, tiny_models, full_pretrain):
    from mambamim.engine.pretrain_loop import pretrain

    part = pretrain(_pre(cache, tmp_path / "part", stop_after=4))  # inside epoch 1
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 4
    pretrain(PretrainConfig(resume=str(part), device="cpu", workers=2, progress=False))
    assert _losses(part) == _losses(full_pretrain) and len(_losses(part)) == 7
    _assert_same_weights(full_pretrain, part, "pretrainer")
    # resuming with another number of workers changes nothing either
    other = pretrain(_pre(cache, tmp_path / "other", stop_after=5, workers=0))
    pretrain(PretrainConfig(resume=str(other), device="cpu", workers=1, progress=False))
    assert _losses(other) == _losses(full_pretrain)
    _assert_same_weights(full_pretrain, other, "pretrainer")


def test_finetune_resume_with_workers_is_bit_exact(cache, tmp_path, tiny_models):
    from mambamim.engine.finetune_loop import finetune

    kw = dict(data=str(cache), crop=16, batch_size=2, num_crops=2, iterations=6, warmup_steps=1, workers=2,
              device="cpu", progress=False, log_every=1, fold=-1, val_every=0, lr=1e-2, seed=1)
    full = finetune(FinetuneConfig(out=str(tmp_path / "full"), **kw))
    part = finetune(FinetuneConfig(out=str(tmp_path / "part"), stop_after=4, **kw))  # inside epoch 1 (3 a epoch)
    finetune(FinetuneConfig(resume=str(part), device="cpu", workers=2, progress=False))
    assert _losses(part) == _losses(full) and len(_losses(full)) == 6
    _assert_same_weights(full, part, "model")


def _cli(cache, run, *extra):
    return ["pretrain", "--data", str(cache), "--out", str(run), "--crop", "16", "--batch-size", "2", "--num-crops",
            "2", "--steps", "7", "--warmup-steps", "2", "--workers", "2", "--device", "cpu", "--no-progress",
            "--vis-every", "0", "--log-every", "1", "--save-every", "1", "--lr", "1e-2", "--seed", "3", *extra]


@pytest.fixture
def loader_workers(monkeypatch):
    """The ``workers`` each training session built its loader with."""
    from mambamim.engine import pretrain_loop

    seen, real = [], pretrain_loop.make_train_loader

    def spy(cache, config, *a, **k):
        seen.append(config.workers)
        return real(cache, config, *a, **k)

    monkeypatch.setattr(pretrain_loop, "make_train_loader", spy)
    return seen


def test_cli_resume_keeps_the_saved_options_unless_given(cache, tmp_path, tiny_models, loader_workers, capsys,
                                                         full_pretrain):
    import yaml

    from mambamim.cli.main import main

    run = tmp_path / "run"
    assert main(_cli(cache, run, "--stop-after", "2")) == 0
    # no option given: the saved ones (workers 2, not the CLI default 4; device cpu, not auto), and the run
    # goes on to its end (--stop-after belongs to the session)
    assert main(["pretrain", "--resume", str(run), "--stop-after", "1"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["workers"], cfg["device"], cfg["log_every"], cfg["progress"]) == (2, "cpu", 1, True)
    assert main(["pretrain", "--resume", str(run), "--no-progress", "--workers", "1", "--log-every", "2"]) == 0
    assert loader_workers == [2, 2, 1]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["workers"], cfg["log_every"], cfg["stop_after"], cfg["progress"]) == (1, 2, None, False)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 7
    _assert_same_weights(full_pretrain, run, "pretrainer")  # three sessions, 2 + 1 workers: still exact
    # an option that would change the training is refused, naming it, in one line
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--lr", "0.5", "--crop", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lr (saved 0.01, given 0.5)" in err and "crop" not in err
    assert "Traceback" not in err


def _stopped_run(cache, tmp_path, name="part"):
    from mambamim.cli.main import main

    run = tmp_path / name
    assert main(_cli(cache, run, "--stop-after", "5")) == 0  # epoch_0001.pt at step 3, last.pt at step 5
    names = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert names == ["epoch_0001.pt", "last.pt"]
    return run


def test_truncated_last_pt_falls_back_to_the_newest_epoch_checkpoint(cache, tmp_path, tiny_models, caplog,
                                                                     full_pretrain):
    from mambamim.cli.main import main

    run = _stopped_run(cache, tmp_path)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        assert main(["pretrain", "--resume", str(run)]) == 0
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "epoch_0001.pt" in r.getMessage()]
    assert len(warning) == 1 and str(last) in warning[0] and "unreadable" in warning[0] and "step 3" in warning[0]
    assert load_checkpoint(last)["step"] == 7
    assert _losses(run) == _losses(full_pretrain)  # steps 4 and 5 trained again, the same way
    _assert_same_weights(full_pretrain, run, "pretrainer")


def test_deleted_last_pt_is_reported_and_the_epoch_checkpoint_used(cache, tmp_path, tiny_models, caplog):
    from mambamim.cli.main import main

    run = _stopped_run(cache, tmp_path)
    (run / "checkpoints" / "last.pt").unlink()
    with caplog.at_level("WARNING"):
        assert main(["pretrain", "--resume", str(run), "--stop-after", "1"]) == 0
    text = caplog.text
    assert "last.pt is missing (deleted?)" in text and "epoch_0001.pt (step 3)" in text
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4


def test_no_valid_checkpoint_is_a_one_line_error_naming_the_run(cache, tmp_path, tiny_models, capsys):
    from mambamim.cli.main import main

    run = _stopped_run(cache, tmp_path)
    for path in (run / "checkpoints").glob("*.pt"):
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"cannot resume {run}: no valid checkpoint" in err and "epoch_0001.pt" in err
    for path in (run / "checkpoints").glob("*.pt"):
        path.unlink()
    assert main(["pretrain", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot resume {run}: no checkpoint" in err
