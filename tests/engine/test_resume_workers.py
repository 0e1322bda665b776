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

    monkeypatch.setattr(pretrain_loop, "_make_pretrainer", lambda cfg: TinyPretrainer(cfg.in_channels, cfg.mask_ratio))
    monkeypatch.setattr(pretrain_loop, "_fixed_volume", lambda *a, **k: None)
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
        mp.setattr(pretrain_loop, "_make_pretrainer", lambda cfg: TinyPretrainer(cfg.in_channels, cfg.mask_ratio))
        mp.setattr(pretrain_loop, "_fixed_volume", lambda *a, **k: None)
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

    kw = dict(data=str(cache), crop=16, batch_size=2, num_crops=2, iterations=5, warmup_steps=1, workers=2,
              device="cpu", progress=False, log_every=1, fold=-1, val_every=0, lr=1e-2, seed=1)
    full = finetune(FinetuneConfig(out=str(tmp_path / "full"), **kw))
    part = finetune(FinetuneConfig(out=str(tmp_path / "part"), stop_after=2, **kw))
    finetune(FinetuneConfig(resume=str(part), device="cpu", workers=2, progress=False))
    assert _losses(part) == _losses(full) and len(_losses(full)) == 5
    _assert_same_weights(full, part, "model")
