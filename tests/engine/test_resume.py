"""Exact resume: N steps in one go == N/2 steps, stop, resume, N/2 more."""

from __future__ import annotations

import pytest
import torch

from engine_standins import fake_cache, patch_finetune, patch_pretrain
from mambamim.engine.checkpoint import load_checkpoint
from mambamim.engine.config import PretrainConfig
from mambamim.engine.pretrain_loop import NonFiniteLossError, TrainingInterrupted, pretrain


def _cfg(tmp_path, out, **kw):
    base = dict(data=str(tmp_path / "cache"), out=str(tmp_path / out), crop=16, batch_size=2, num_crops=1,
                steps=7, warmup_steps=2, workers=0, device="cpu", progress=False, vis_every=0, log_every=1,
                save_every=0, lr=1e-2)
    base.update(kw)
    return PretrainConfig(**base)


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["pretrainer"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    fake_cache(tmp / "cache")
    with pytest.MonkeyPatch.context() as mp:
        patch_pretrain(mp)
        return pretrain(_cfg(tmp, "full"))


# 3 batches per epoch: stop exactly at the end of epoch 0, or inside epoch 1 (the replay of a
# later epoch needs the epoch-start random state)
@pytest.mark.parametrize("stop", [3, 4])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, stop, full_run):
    fake_cache(tmp_path / "cache")
    patch_pretrain(monkeypatch)
    full = full_run
    part = pretrain(_cfg(tmp_path, "part", stop_after=stop))
    ck = load_checkpoint(part / "checkpoints" / "last.pt")
    assert ck["step"] == stop
    pretrain(PretrainConfig(resume=str(part), device="cpu", workers=0, progress=False))
    a, b = _weights(full), _weights(part)
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 7
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    # the runs really trained (weights moved from the interrupted state)
    assert any(not torch.equal(ck["pretrainer"][k], b[k]) for k in b)
    # metrics rows cover every step once
    rows = (part / "metrics.csv").read_text().strip().splitlines()
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == list(range(1, 8))


def test_sigterm_checkpoints_at_step_boundary_and_resumes_exactly(tmp_path, monkeypatch, full_run):
    fake_cache(tmp_path / "cache")
    patch_pretrain(monkeypatch, signal_at_call=2)
    with pytest.raises(TrainingInterrupted, match="step 2/7.*--resume"):
        pretrain(_cfg(tmp_path, "sig"))
    assert load_checkpoint(tmp_path / "sig" / "checkpoints" / "last.pt")["step"] == 2
    patch_pretrain(monkeypatch)
    pretrain(PretrainConfig(resume=str(tmp_path / "sig"), device="cpu", workers=0, progress=False))
    a, b = _weights(full_run), _weights(tmp_path / "sig")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch):
    fake_cache(tmp_path / "cache")
    patch_pretrain(monkeypatch, nan_at_call=4)
    cfg = _cfg(tmp_path, "nan", checkpoint_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 .*last good checkpoint .*last\.pt \(step 3\)"):
        pretrain(cfg)
    ck = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert ck["step"] == 3
    assert all(torch.isfinite(v).all() for v in ck["pretrainer"].values())


@pytest.mark.parametrize("clip", [None, 1.0])
def test_backward_step_checks_before_the_update_with_one_sync(clip, monkeypatch):
    """The loss and gradient-norm checks come after the backward pass (one host read per step), yet still
    before the update: a non-finite loss or gradient norm leaves every parameter and the step count as
    they were; a finite step returns the loss and the norm clip_grad_norm_ measured."""
    from mambamim.engine.loop import TrainLoop

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    loop = TrainLoop(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                     scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"), amp="none",
                     clip_grad=clip)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    x = torch.randn(5, 4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        loop.backward_step(model(x).sum() * float("nan"))
    assert loop.step == 0 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    if clip:  # a finite loss whose gradient overflows
        hook = model.bias.register_hook(lambda g: g * float("inf"))
        with pytest.raises(NonFiniteLossError, match="gradient norm is inf"):
            loop.backward_step(model(x).sum())
        hook.remove()
        assert loop.step == 0 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    loop.backward_step(model(x).pow(2).mean())  # the optimiser makes its state from host numbers, once
    before = [p.detach().clone() for p in model.parameters()]
    reads.clear()
    loss = model(x).pow(2).mean()
    expected = torch.nn.utils.get_total_norm([g for g in torch.autograd.grad(loss, list(model.parameters()),
                                                                             retain_graph=True)]) if clip else None
    # and no tensor is made from host numbers: on CUDA that copy would wait for the queued forward pass
    real_tensor, real_new_tensor = torch.tensor, torch.Tensor.new_tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: reads.append("tensor") or real_tensor(*a, **k))
    monkeypatch.setattr(torch.Tensor, "new_tensor", lambda *a, **k: reads.append("new_tensor") or real_new_tensor(*a, **k))
    value, norm = loop.backward_step(loss)
    monkeypatch.setattr(torch, "tensor", real_tensor)
    assert reads == [1] and loop.step == 2
    assert value == pytest.approx(loss.item())
    assert (norm is None) if not clip else norm == pytest.approx(float(expected), rel=1e-6)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_optimizer_keeps_this_runs_implementation_when_resuming():
    """A checkpoint written by a fused AdamW (what CUDA runs use) resumes into a CPU run with the CPU's own
    implementation, the moments intact; and the reverse."""
    from mambamim.engine.loop import TrainLoop
    from mambamim.engine.optim import build_optimizer

    def loop_for(opt, model):
        return TrainLoop(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"), amp="none",
                         clip_grad=1.0)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    cpu_opt = build_optimizer(model, 1e-2, 0.05)
    assert [g["fused"] for g in cpu_opt.param_groups] == [None, None]  # fused only where every parameter is on CUDA
    for fused_first in (True, False):
        first = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                   for g in cpu_opt.param_groups], lr=1e-2, fused=fused_first or None)
        src = loop_for(first, model)
        src.backward_step(model(torch.randn(5, 4)).pow(2).mean())
        state = src.state_dict("model")
        dst_opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                     for g in cpu_opt.param_groups], lr=1e-2, fused=(not fused_first) or None)
        dst = loop_for(dst_opt, model)
        dst.load_state_dict(state, "model")
        assert [g["fused"] for g in dst_opt.param_groups] == [(not fused_first) or None] * 2
        for key, saved in state["optimizer"]["state"].items():
            torch.testing.assert_close(dst_opt.state_dict()["state"][key]["exp_avg"], saved["exp_avg"])
        dst.backward_step(model(torch.randn(5, 4)).pow(2).mean())
        assert dst.step == 2


def test_finetune_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from mambamim.engine.config import FinetuneConfig
    from mambamim.engine.finetune_loop import finetune

    fake_cache(tmp_path / "cache")
    patch_finetune(monkeypatch)
    kw = dict(data=str(tmp_path / "cache"), crop=16, batch_size=2, num_crops=1, iterations=5, warmup_steps=1,
              workers=0, device="cpu", progress=False, log_every=1, fold=-1, val_every=0, lr=1e-2)
    full = finetune(FinetuneConfig(out=str(tmp_path / "full"), **kw))
    part = finetune(FinetuneConfig(out=str(tmp_path / "part"), stop_after=4, **kw))  # into epoch 1
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 4
    finetune(FinetuneConfig(resume=str(part), device="cpu", workers=0, progress=False))
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 5 and a["model_config"]["kwargs"]["num_classes"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    import torch

    from mambamim.engine import trainer

    def broken_compile(model):
        def fail(x):
            raise RuntimeError("backend exploded")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = torch.nn.Linear(3, 2)
    forward, prepare = trainer.fast_forward(model, torch.device("cpu"), True)
    x = torch.randn(4, 3)
    with caplog.at_level("WARNING"):
        out = forward(prepare(x))
    assert torch.equal(out, model(x)) and "backend exploded" in caplog.text
    assert torch.equal(forward(x), model(x))


def test_recompile_failure_falls_back_to_eager(monkeypatch, caplog):
    """A compile that works for the first batch size but fails for another (the last, smaller batch of an
    epoch) does not end the run."""
    import torch

    from mambamim.engine import trainer

    def shape_sensitive_compile(model):
        def run(x):
            if x.shape[0] != 4:
                raise RuntimeError("symbolic batch exploded")
            return model(x) + 0

        return run

    monkeypatch.setattr(torch, "compile", shape_sensitive_compile)
    model = torch.nn.Linear(3, 2)
    forward, _ = trainer.fast_forward(model, torch.device("cpu"), True)
    assert torch.equal(forward(torch.ones(4, 3)), model(torch.ones(4, 3)))
    with caplog.at_level("WARNING"):
        out = forward(torch.ones(2, 3))
    assert torch.equal(out, model(torch.ones(2, 3)))
    assert "recompiling for input shape (2, 3)" in caplog.text and "symbolic batch exploded" in caplog.text


def test_cuda_graphs_need_a_cuda_device(caplog):
    from mambamim.engine import trainer

    with caplog.at_level("WARNING"):
        forward, _ = trainer.fast_forward(torch.nn.Linear(3, 2), torch.device("cpu"), True, cuda_graphs=True)
    assert not forward.cuda_graphs and "CUDA graphs need one CUDA device" in caplog.text


def test_sparse_full_res_option_reaches_the_pretrainer(tmp_path):
    from mambamim.pretrain import pretrainer_from_spec

    def _make_pretrainer(config):
        return pretrainer_from_spec(config.pretrainer_spec())

    model = _make_pretrainer(_cfg(tmp_path, "x", size="tiny", sparse_full_res=True))
    assert model.sparse_full_res is True
    assert not _make_pretrainer(_cfg(tmp_path, "y", size="tiny", sparse_full_res=False)).sparse_full_res
    # the default (None) turns it on wherever it applies, and off where it cannot
    assert _make_pretrainer(_cfg(tmp_path, "d", size="tiny")).sparse_full_res
    assert not _make_pretrainer(_cfg(tmp_path, "e", size="tiny", bottom_up=False)).sparse_full_res
    assert not _make_pretrainer(_cfg(tmp_path, "f", size="tiny", model="vim_unetr")).sparse_full_res
    # refused before a run folder exists
    with pytest.raises(ValueError, match="sparse_full_res"):
        _cfg(tmp_path, "z", model="vim_unetr", sparse_full_res=True).validate()
    # levels on cells: 2 under CUDA graphs (the faster there), else 1, unless given
    assert _make_pretrainer(_cfg(tmp_path, "g", size="tiny")).sparse_levels == 1
    assert _make_pretrainer(_cfg(tmp_path, "h", size="tiny", compile=True, cuda_graphs=True)).sparse_levels == 2
    assert _make_pretrainer(_cfg(tmp_path, "i", size="tiny", compile=True, cuda_graphs=True,
                                 sparse_levels=1)).sparse_levels == 1
    assert _make_pretrainer(_cfg(tmp_path, "j", size="tiny", sparse_levels=3)).sparse_levels == 3
    for bad in (0, 4, True):
        with pytest.raises(ValueError, match="sparse_levels"):
            _cfg(tmp_path, "k", sparse_levels=bad).validate()
    with pytest.raises(ValueError, match="cuda_graphs needs compile"):
        _cfg(tmp_path, "g", cuda_graphs=True).validate()


def _saved_bytes_of_compiled_step(memory_budget: float, monkeypatch) -> int:
    """Bytes the compiled tiny pre-trainer's forward graph keeps for the backward pass, partitioned as
    Inductor partitions (min-cut, its decompositions) and run through CompiledOrEager."""
    import functools

    import torch

    from mambamim.runtime.compiling import CompiledOrEager, kept_tensors_backend
    from mambamim.pretrain import create_pretrainer

    backend, kept = kept_tensors_backend()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_pretrainer("hymamba", size="tiny")
    with monkeypatch.context() as m:
        m.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
        forward = CompiledOrEager(model, memory_budget=memory_budget)
        forward(torch.rand(2, 1, 32, 32, 32))["loss"].backward()
    torch._dynamo.reset()
    assert forward.state is True and kept
    return sum(k[0] for k in kept)


@pytest.mark.slow
def test_memory_budget_makes_the_compiled_step_keep_less(monkeypatch):
    import torch

    full = _saved_bytes_of_compiled_step(1.0, monkeypatch)
    budget = _saved_bytes_of_compiled_step(0.5, monkeypatch)
    assert budget < 0.8 * full, (budget, full)
    assert torch._functorch.config.activation_memory_budget == 1.0  # scoped to the compiling calls


def test_memory_budget_is_validated(tmp_path):
    import pytest as _pytest

    from mambamim.runtime.compiling import CompiledOrEager
    from mambamim.engine.config import PretrainConfig

    with _pytest.raises(ValueError, match="memory_budget"):
        CompiledOrEager(lambda x: x, memory_budget=0.0)
    with _pytest.raises(ValueError, match="memory_budget"):
        PretrainConfig(data=str(tmp_path), out=str(tmp_path / "r"), memory_budget=1.5).validate()


def test_resume_keeps_the_runs_planned_length(tmp_path, monkeypatch, caplog):
    """An epoch-based run resumed where it would count another total (another number of processes, or
    cases added) keeps the length its learning-rate schedule was built for."""
    import logging

    from mambamim.engine.checkpoint import save_checkpoint

    fake_cache(tmp_path / "cache")
    patch_pretrain(monkeypatch)
    part = pretrain(_cfg(tmp_path, "part", steps=None, epochs=2, stop_after=2))  # 3 batches an epoch: 6 steps
    ck = load_checkpoint(part / "checkpoints" / "last.pt")
    assert ck["total_steps"] == 6
    ck["total_steps"] = 8  # as if the run had been planned on fewer processes
    save_checkpoint(part / "checkpoints" / "last.pt", ck)
    with caplog.at_level(logging.WARNING):
        pretrain(PretrainConfig(resume=str(part), device="cpu", workers=0, progress=False))
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 8
    assert "the run was planned for 8" in caplog.text
