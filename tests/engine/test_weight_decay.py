"""build_optimizer: no weight decay where the Mamba mixer (or any module) says so, on norms, biases and tokens."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mambamim.engine import distributed as D
from mambamim.engine import loop as engine_loop
from mambamim.engine.loop import StopSignal, build_train_loop
from mambamim.engine.optim import build_optimizer

MIXER_NO_DECAY = {"A_log", "D", "A_b_log", "D_b"}
NORM = re.compile(r"Norm(\dd)?$")  # LayerNorm, BatchNorm3d, SparseGroupNorm, ...; not ConvNormAct
CONV_OR_LINEAR = re.compile(r"^(Linear|\w*Conv(Transpose)?\dd)$")


def _decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """id(param) -> weight decay; asserts that no parameter is in two groups."""
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in more than one group"
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def _tiny(kind: str) -> nn.Module:
    if kind == "model":
        from mambamim.models import create_model

        return create_model("hymamba", size="tiny", num_classes=3)
    from mambamim.pretrain import create_pretrainer

    return create_pretrainer("hymamba", size="tiny")


@pytest.mark.parametrize("kind", ["model", "pretrainer"])
def test_mixer_norm_and_bias_parameters_get_no_weight_decay(kind):
    model = _tiny(kind)
    decay = _decay_of(build_optimizer(model, 1e-3, 0.05))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(decay) == {id(p) for p in trainable} and len(decay) == len(trainable)

    modules = dict(model.named_modules())
    counts = {"mixer": 0, "norm": 0, "bias": 0, "weight": 0}
    for name, param in model.named_parameters():
        owner_name, leaf = name.rpartition(".")[::2]
        owner = type(modules[owner_name]).__name__
        if leaf in MIXER_NO_DECAY and owner == "MambaMixer":
            assert param._no_weight_decay
            if leaf == "A_log" or leaf == "A_b_log":
                assert param.ndim == 2  # what the old ndim <= 1 rule decayed
            counts["mixer"] += 1
            assert decay[id(param)] == 0.0, name
        elif NORM.search(owner):
            counts["norm"] += 1
            assert decay[id(param)] == 0.0, name
        elif leaf == "bias":
            counts["bias"] += 1
            assert decay[id(param)] == 0.0, name
        elif leaf == "weight" and CONV_OR_LINEAR.match(owner):
            counts["weight"] += 1
            assert decay[id(param)] == 0.05, name
    assert counts["mixer"] == 4 and min(counts.values()) > 0, counts  # the checks ran on something


class _Timm(nn.Module):
    """timm's convention: ``no_weight_decay()`` names parameters relative to the module."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 8, 4))
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.zeros(3, 3))

    def no_weight_decay(self):
        return {"pos_embed", "proj.weight", "table", "missing"}  # a buffer and an absent name are ignored


class _Listed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(4, 4))
        self.kept = nn.Parameter(torch.zeros(4, 4))
        self._no_weight_decay = ("gate",)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.timm = _Timm()
        self.listed = _Listed()
        self.all_of_it = nn.Linear(4, 4)
        self.all_of_it._no_weight_decay = True  # every parameter of that module
        self.marked = nn.Parameter(torch.zeros(4, 4))
        self.marked._no_weight_decay = True
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))  # 3-d, but a token
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, 4))])
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
        self.conv = nn.Conv3d(1, 2, 3)
        self.no_weight_decay = nn.Linear(4, 4)  # a submodule of that name is not the timm method


def test_every_no_weight_decay_convention_is_honoured(caplog):
    toy = _Toy()
    with caplog.at_level(logging.INFO, logger="mambamim.engine.optim"):
        decay = _decay_of(build_optimizer(toy, 1e-3, 0.1))
    names = {name: decay.get(id(p)) for name, p in toy.named_parameters()}
    zero = {"timm.pos_embed", "timm.proj.weight", "timm.proj.bias", "listed.gate", "all_of_it.weight",
            "all_of_it.bias", "marked", "cls_token", "mask_tokens.0", "conv.bias", "no_weight_decay.bias"}
    assert {n for n, wd in names.items() if wd == 0.0} == zero
    assert {n for n, wd in names.items() if wd == 0.1} == {"listed.kept", "conv.weight", "no_weight_decay.weight"}
    assert names["frozen"] is None  # not given to the optimiser at all
    line = next(r.getMessage() for r in caplog.records if "weight decay" in r.getMessage())
    assert "on 3 tensors" in line and "none on 11 tensors" in line


def test_both_training_loops_build_their_optimiser_with_build_optimizer(monkeypatch):
    """Both trainers get their optimiser from the base Trainer's build_train_loop, hence from build_optimizer."""
    from mambamim.engine.finetune_loop import FinetuneTrainer
    from mambamim.engine.pretrain_loop import PretrainTrainer
    from mambamim.engine.trainer import Trainer

    assert FinetuneTrainer.setup is Trainer.setup and PretrainTrainer.setup is Trainer.setup
    built = []

    def spy(model, lr, weight_decay):
        built.append((lr, weight_decay))
        return build_optimizer(model, lr, weight_decay)

    monkeypatch.setattr(engine_loop, "build_optimizer", spy)
    model = _tiny("model")
    config = SimpleNamespace(warmup_steps=2, lr=1e-3, weight_decay=0.05, min_lr_ratio=0.0, amp="none", clip_grad=1.0)
    loop, _ = build_train_loop(model, config, D.DistContext(), 10, StopSignal())
    assert built == [(1e-3, 0.05)]
    decay = _decay_of(loop.optimizer)
    a_log = next(p for n, p in model.named_parameters() if n.endswith("mixer.A_log"))
    assert decay[id(a_log)] == 0.0
