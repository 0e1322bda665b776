"""CUDA path of the training loops (bf16 autocast, CUDA RNG capture, resume); skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from engine_standins import make_tiny_cache
from mambamim.engine.checkpoint import load_checkpoint
from mambamim.engine.config import FinetuneConfig, PretrainConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_pretrain_resume_and_finetune_on_cuda(tmp_path):
    from mambamim.engine.finetune_loop import finetune
    from mambamim.engine.pretrain_loop import pretrain

    cache = make_tiny_cache(tmp_path, num=3)
    common = dict(data=str(cache), size="tiny", crop=32, batch_size=2, num_crops=2, workers=0, device="cuda",
                  progress=False, log_every=1)
    run = pretrain(PretrainConfig(out=str(tmp_path / "pre"), steps=4, stop_after=2, decoder_width=32, vis_every=1,
                                  **common))
    pretrain(PretrainConfig(resume=str(run), device="cuda", workers=0, progress=False))
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["step"] == 4 and last["config"]["amp"] == "auto"
    assert "cuda" in last["rng"][0]["now"]["global"]
    assert all(torch.isfinite(v).all() for v in last["pretrainer"].values() if v.is_floating_point())
    ft = finetune(FinetuneConfig(out=str(tmp_path / "ft"), pretrained=str(run), iterations=2, val_every=2, fold=0,
                                 num_folds=3, **common))
    best = load_checkpoint(ft / "checkpoints" / "best.pt")
    assert 0.0 <= best["best_metric"] <= 1.0


def test_compiled_pretrain_with_cuda_graphs_on_cuda(tmp_path):
    """--compile --cuda-graphs: 3 volumes x 2 crops per epoch in batches of 4 leave a last batch of 2, so
    the step is captured for two shapes. The run logs the same losses and ends with the same weights as the
    compiled run without CUDA graphs (the same kernels, replayed). ``sparse_levels`` is given: left to
    its default it is 2 under CUDA graphs and 1 without, two different computations whose bf16 rounding
    differs, which is what made the weights of the two runs disagree in earlier sessions."""
    from mambamim.engine.pretrain_loop import pretrain

    cache = make_tiny_cache(tmp_path, num=3)
    runs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        runs[graphs] = pretrain(PretrainConfig(
            data=str(cache), out=str(tmp_path / f"pre{int(graphs)}"), size="tiny", crop=32, batch_size=4,
            num_crops=2, workers=0, device="cuda", progress=False, log_every=1, steps=5, decoder_width=32,
            vis_every=0, compile=True, cuda_graphs=graphs, sparse_levels=2))
    (steps, plain), (steps_g, graphed) = _loss_curve(runs[False]), _loss_curve(runs[True])
    assert steps == steps_g == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(plain), rtol=1e-3, atol=1e-5)
    a, b = (load_checkpoint(runs[g] / "checkpoints" / "last.pt") for g in (False, True))
    assert b["step"] == 5
    for key, v in a["pretrainer"].items():
        if v.is_floating_point():
            assert torch.isfinite(b["pretrainer"][key]).all(), key
            torch.testing.assert_close(b["pretrainer"][key], v, rtol=1e-3, atol=1e-4, msg=key)


def _loss_curve(run) -> tuple[list[int], list[float]]:
    """(steps, training losses) of a run's metrics.csv."""
    import csv

    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("phase", "train") == "train"]
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
