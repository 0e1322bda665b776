"""Warm-up cosine schedule, data position helpers, run configurations, data resolution."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mambamim.engine.config import FinetuneConfig, PretrainConfig, find_cache, resolve_data
from mambamim.engine.schedule import WarmupCosine, default_warmup_steps, open_epoch, warmup_cosine_scheduler


def test_warmup_cosine_values_and_state_dict():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = warmup_cosine_scheduler(opt, 2, 10)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 8))])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = warmup_cosine_scheduler(opt2, 0, 1)  # different schedule, replaced by the state dict
    sched2.load_state_dict(sched.state_dict())
    assert sched2.lr_lambdas[0].total_steps == 10 and sched2.last_epoch == sched.last_epoch
    with pytest.raises(ValueError):
        WarmupCosine(5, 3)
    assert default_warmup_steps(1000) == 50 and default_warmup_steps(1) == 0


def test_open_epoch_sets_epoch_and_skips():
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    ds = list(range(10))
    loader = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3))
    full = [b.tolist() for b in open_epoch(loader, 5)]
    rest = [b.tolist() for b in open_epoch(loader, 5, skip=2)]
    assert rest == full[2:]
    assert [b.tolist() for b in open_epoch(loader, 6)] != full  # another epoch, another order


def test_config_yaml_roundtrip_and_validation(tmp_path):
    cfg = PretrainConfig(data="d", out="o", steps=10, size="tiny", cases=["a", "b"], clip_grad=None)
    back = PretrainConfig.load_yaml(cfg.save_yaml(tmp_path / "config.yaml"))
    assert back == cfg
    with pytest.raises(ValueError, match="'pretrain' configuration, expected 'finetune'"):
        FinetuneConfig.load_yaml(tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="unknown PretrainConfig option"):
        PretrainConfig.from_dict({"data": "d", "out": "o", "mask_ration": 0.5})
    for bad in (dict(mask_ratio=1.0), dict(crop=40), dict(token="x"), dict(batch_size=6), dict(scan="spiral")):
        with pytest.raises(ValueError):
            PretrainConfig(data="d", out="o", **bad).validate()
    with pytest.raises(ValueError, match="fold"):
        FinetuneConfig(data="d", out="o", fold=5).validate()
    FinetuneConfig(data="d", out="o", fold=-1).validate()


def test_resolve_data_uses_cache_or_prepares_into_run(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "dataset.json").write_text(json.dumps({"format": "mambamim-cache", "cases": []}))
    assert resolve_data(cache, tmp_path / "run") == cache
    assert resolve_data(cache / "dataset.json", tmp_path / "run") == cache
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"name": "decathlon", "training": []}))
    assert find_cache(raw) is None
    calls = []

    def fake_prepare(inp, out, params, workers, strict, progress):
        calls.append((str(inp), str(out)))
        out.mkdir(parents=True)
        (out / "dataset.json").write_text(json.dumps({"format": "mambamim-cache", "cases": []}))

    import mambamim.data.prepare as prep

    monkeypatch.setattr(prep, "prepare_dataset", fake_prepare)
    assert resolve_data(raw, tmp_path / "run") == tmp_path / "run" / "cache"
    assert resolve_data(raw, tmp_path / "run") == tmp_path / "run" / "cache"  # reused, not redone
    assert calls == [(str(raw), str(tmp_path / "run" / "cache"))]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_data(tmp_path / "nowhere", tmp_path / "run")


def test_unknown_model_or_size_fails_and_lists_the_known_ones():
    import pytest

    from mambamim.engine.config import FinetuneConfig, PretrainConfig

    with pytest.raises(ValueError, match="known models: hymamba, mednext_cnn, vim_unetr"):
        PretrainConfig(data="c", out="o", model="nonexistent").validate()
    with pytest.raises(ValueError, match="has no size 'authors'"):
        FinetuneConfig(data="c", out="o", model="vim_unetr", size="authors").validate()
    PretrainConfig(data="c", out="o", model="mednext_cnn", size="mini").validate()
