"""Two "nodes" on localhost through torchrun's c10d rendezvous (gloo, CPU): the real ``pretrain``
command on a real tiny cache; identical replicas, each rank reads its own shard, rank 0 writes.

Each node is a separate ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`` process, as on
two machines. The worker entry point is this file run as a script: it wraps the pre-training factories
to record what its rank built and read, runs ``mambamim pretrain`` (``mambamim.cli.main.main``, what
``-m mambamim`` runs) with the arguments torchrun passes on, then saves the record.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

NODES = 2
CASES = 4  # even: the per-epoch shards are exactly disjoint (an odd count pads one case onto a second rank)
STEPS = 3
PRETRAIN = ["--size", "tiny", "--crop", "32", "--batch-size", "2", "--num-crops", "1", "--steps", str(STEPS),
            "--workers", "0", "--device", "cpu", "--warmup-steps", "1", "--lr", "1e-2", "--log-every", "1",
            "--vis-every", "0", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_command(port: int, rdzv_id: str, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
            "--rdzv-conf", "join_timeout=120", "--max-restarts", "0", "--monitor-interval", "0.5",
            str(Path(__file__).resolve()), "pretrain", "--data", str(data), "--out", str(out), *PRETRAIN]


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_replicas_identical_and_sharded(tmp_path):
    from engine_standins import make_tiny_cache

    cache = make_tiny_cache(tmp_path / "data", num=CASES)
    run, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MULTINODE_RECORD": str(record),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the rendezvous sets them
        env.pop(name, None)
    cmd = _node_command(_free_port(), uuid.uuid4().hex[:12], cache, run)
    logs = [tmp_path / f"node{n}.log" for n in range(NODES)]
    nodes = [subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs]
    deadline = time.monotonic() + 300
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    codes = [node.returncode for node in nodes]
    assert codes == [0] * NODES, f"exit codes {codes}\n" + "\n".join(log.read_text()[-3000:] for log in logs)

    ranks = [torch.load(record / f"rank{r}.pt", weights_only=False) for r in range(NODES)]
    # two nodes of one process each, joined through the rendezvous (not a single torchrun of two processes)
    assert sorted(int(r["env"]["GROUP_RANK"]) for r in ranks) == list(range(NODES))
    assert all(r["env"]["LOCAL_RANK"] == "0" and r["env"]["WORLD_SIZE"] == str(NODES) for r in ranks)
    assert all(r["ctx"] == {"world_size": NODES, "backend": "gloo", "distributed": True} for r in ranks)

    # replicas: rank 1 started from other weights (seed + rank); DDP broadcast rank 0's and kept them equal.
    # Parameters only: DDP copies rank 0's buffers (BatchNorm running statistics) to every rank at the start
    # of each forward pass, so after the last step each rank holds the statistics of its own last batch.
    first, second = ranks[0], ranks[1]
    assert any(not torch.equal(first["init"][k], second["init"][k]) for k in first["init"])
    for k in first["final"]:
        assert torch.equal(first["final"][k], second["final"][k]), k
    assert any(not torch.equal(first["init"][k], first["final"][k]) for k in first["init"])  # it trained

    # only rank 0 wrote, and what it wrote is what every rank holds
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] == STEPS and len(saved["rng"]) == NODES
    for k in first["final"]:
        assert torch.equal(saved["pretrainer"][k], second["final"][k]), k
    for k in first["buffers"]:  # the saved statistics are rank 0's
        assert torch.equal(saved["pretrainer"][k], first["buffers"][k]), k
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + STEPS  # one writer: one row per step

    # each rank read its own shard: per epoch the ranks' case sets are disjoint and together cover the list
    # (2 volumes per step and rank, 4 cases, 2 ranks: one step per epoch, so 3 steps read 3 whole epochs)
    all_ids = {c["id"] for c in first["cases"]}
    assert len(all_ids) == CASES and first["cases"] == second["cases"]
    for epoch in range(STEPS):
        mine = [[cid for e, cid in r["reads"] if e == epoch] for r in ranks]
        assert all(len(m) == CASES // NODES for m in mine), (epoch, mine)
        assert set(mine[0]).isdisjoint(mine[1]), (epoch, mine)
        assert set(mine[0]) | set(mine[1]) == all_ids, (epoch, mine)
    assert all(len(r["reads"]) == STEPS * CASES // NODES for r in ranks)  # nothing else was read


def _rank_main(argv: list[str]) -> int:
    """One torchrun worker: run ``mambamim pretrain`` with recording factories, then save the record."""
    from mambamim.cli.main import main
    from mambamim.engine import pretrain_loop

    record: dict = {"env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE")},
                    "reads": []}
    build_model, make_loader = pretrain_loop.PretrainTrainer.build_model, pretrain_loop.make_train_loader

    def recording_pretrainer(trainer):
        model = build_model(trainer)
        record["model"] = model  # the module DDP wraps: its parameters are the replica's
        record["init"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return model

    def recording_loader(cache, config, ctx, labeled, augment, case_ids=None):
        loader = make_loader(cache, config, ctx, labeled, augment, case_ids)
        dataset = loader.dataset
        base = type(dataset)

        class Recording(base):  # the loader indexes through the class: record every item it loads
            def __getitem__(self, key):
                record["reads"].append((int(getattr(key, "epoch", self.epoch)), self.data[int(key)]["id"]))
                return base.__getitem__(self, key)

        dataset.__class__ = Recording
        record["cases"] = [{"id": c["id"]} for c in dataset.data]
        record["ctx"] = {"world_size": ctx.world_size, "backend": ctx.backend, "distributed": ctx.distributed}
        return loader

    pretrain_loop.PretrainTrainer.build_model = recording_pretrainer
    pretrain_loop.make_train_loader = recording_loader
    code = main(argv)
    model = record.pop("model")
    record["final"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    record["buffers"] = {k: v.detach().clone() for k, v in model.named_buffers()}
    torch.save(record, Path(os.environ["MULTINODE_RECORD"]) / f"rank{os.environ['RANK']}.pt")
    return code


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
