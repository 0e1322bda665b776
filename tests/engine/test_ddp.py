"""Two-process gloo DDP on CPU: sharded data, identical replicas, only rank 0 writes."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from engine_standins import TinyPretrainer, make_loader
    from mambamim.engine import pretrain_loop
    from mambamim.engine.config import PretrainConfig

    made, seen = [], []

    def make_pretrainer(cfg):
        made.append(TinyPretrainer(cfg.in_channels, cfg.mask_ratio))
        return made[-1]

    def make(cache, cfg, ctx, labeled, augment, case_ids=None):
        assert ctx.distributed and ctx.world_size == world and ctx.backend == "gloo"
        loader = make_loader(cfg.crop, cfg.batch_size, n=8, distributed=True)
        seen.append(loader)
        return loader

    pretrain_loop.PretrainTrainer.build_model = lambda self: make_pretrainer(self.config)
    pretrain_loop.make_train_loader = make
    pretrain_loop.PretrainTrainer.preview_volume = lambda self: None
    cfg = PretrainConfig(data=os.path.join(root, "cache"), out=os.path.join(root, "run"), crop=16, batch_size=2,
                         num_crops=1, steps=3, warmup_steps=1, workers=0, device="cpu", progress=False, vis_every=0,
                         log_every=1, save_every=0, lr=1e-2, seed=0)
    pretrain_loop.pretrain(cfg)
    sampler = seen[0].sampler
    sampler.set_epoch(0)
    torch.save({"state": made[0].state_dict(), "indices": list(iter(sampler))},
               os.path.join(root, f"rank{rank}.pt"))


def test_two_process_gloo_replicas_identical(tmp_path):
    from engine_standins import TinyPretrainer, fake_cache

    fake_cache(tmp_path / "cache", n=8)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert set(r0["indices"]).isdisjoint(r1["indices"])  # data sharded
    torch.manual_seed(0)
    init = TinyPretrainer().state_dict()
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0)
    assert any(not torch.equal(init[k], r0["state"][k]) for k in init)  # it trained
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").exists() and (run / "encoder.pt").exists()
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # one writer: one row per step
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(saved["rng"]) == 2 and saved["step"] == 3
    for k in r0["state"]:
        assert torch.equal(saved["pretrainer"][k], r0["state"][k])
