"""Resuming on another number of processes keeps the global batch (issue 21): a run of 2 gloo processes
resumed on 1, and a run of 1 resumed on 2, end with the weights of the uninterrupted 2-process run.

The real cache loader is used (its order and augmentation depend only on (seed, epoch, index)); the
stand-in pre-trainer masks a fixed checkerboard, so the loss depends on the data alone and the runs
may differ only by floating-point summation order."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from engine_standins import TinyPretrainer, make_tiny_cache

STEPS = 4  # 4 cases, 2 volumes per global step: 2 steps per epoch


class CheckerboardPretrainer(TinyPretrainer):
    def forward(self, x, mask=None):
        grid = [s // 16 for s in x.shape[2:]]
        i, j, k = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
        board = ((i + j + k) % 2 == 0).expand(x.shape[0], *grid).to(x.device)
        return super().forward(x, mask=board)


def _config(cache, out, **kw):
    from mambamim.engine.config import PretrainConfig

    base = dict(data=str(cache), out=str(out), crop=32, num_crops=1, steps=STEPS, warmup_steps=1, workers=0,
                device="cpu", progress=False, vis_every=0, log_every=1, save_every=0, lr=1e-2, seed=0)
    return PretrainConfig(**{**base, **kw})


def _patch(target) -> None:
    from mambamim.engine import pretrain_loop

    target.setattr(pretrain_loop.PretrainTrainer, "build_model", lambda self: CheckerboardPretrainer())
    target.setattr(pretrain_loop.PretrainTrainer, "preview_volume", lambda self: None)


class _Setter:
    @staticmethod
    def setattr(obj, name, value):
        setattr(obj, name, value)


def _worker(rank: int, world: int, port: int, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mambamim.engine.pretrain_loop import pretrain

    _patch(_Setter)  # a fresh process: nothing to restore
    pretrain(_config(**kwargs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_two(**kwargs) -> None:
    mp.spawn(_worker, args=(2, _free_port(), kwargs), nprocs=2, join=True)


def _on_one(monkeypatch, **kwargs):
    from mambamim.engine.pretrain_loop import pretrain

    with monkeypatch.context() as mp_:
        _patch(mp_)
        return pretrain(_config(**kwargs))


def _weights(run):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return state, state["pretrainer"]


@pytest.mark.slow
def test_resume_on_another_process_count_keeps_the_global_batch(tmp_path, monkeypatch, caplog):
    cache = make_tiny_cache(tmp_path, num=4)
    _on_two(cache=cache, out=tmp_path / "whole", batch_size=1)
    whole_state, whole = _weights(tmp_path / "whole")
    assert whole_state["step"] == STEPS and whole_state["world_size"] == 2

    _on_two(cache=cache, out=tmp_path / "two_then_one", batch_size=1, stop_after=3)  # mid-epoch 1
    with caplog.at_level("WARNING"):
        _on_one(monkeypatch, cache=cache, out=tmp_path / "two_then_one", resume=str(tmp_path / "two_then_one"))
    assert "2 crops per process instead of 1 keep the global batch at 2" in caplog.text
    state, resumed = _weights(tmp_path / "two_then_one")
    assert state["step"] == STEPS and state["world_size"] == 1 and state["config"]["batch_size"] == 2
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-6, msg=key)

    _on_one(monkeypatch, cache=cache, out=tmp_path / "one_then_two", batch_size=2, stop_after=1)
    _on_two(cache=cache, out=tmp_path / "one_then_two", resume=str(tmp_path / "one_then_two"))
    state, resumed = _weights(tmp_path / "one_then_two")
    assert state["step"] == STEPS and state["world_size"] == 2 and state["config"]["batch_size"] == 1
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_a_global_batch_that_does_not_split_is_refused(tmp_path):
    from mambamim.engine.pretrain_loop import PretrainTrainer

    config = _config(tmp_path, tmp_path / "run", batch_size=4, num_crops=2)  # 2 processes x 2 volumes
    trainer = PretrainTrainer(config, SimpleNamespace(world_size=3, is_main=False))
    with pytest.raises(ValueError, match="does not split into whole volumes per process; resume on 1, 2, 4 processes"):
        trainer.match_global_batch({"world_size": 2})
    trainer.ctx = SimpleNamespace(world_size=4, is_main=False)
    trainer.match_global_batch({"rng": [None, None]})  # older checkpoints: the world size is the RNG list's length
    assert config.batch_size == 2
