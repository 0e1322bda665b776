"""Configurations read the model registry: model, size, pre-trainability, patch size; and the pre-trainer
a configuration describes (``PretrainConfig.pretrainer_spec``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mambamim.engine.config import (
    PATCH_SIZE,
    FinetuneConfig,
    PretrainConfig,
    resolve_sparse_full_res,
    resolve_sparse_levels,
)
from mambamim.models.registry import REGISTRY, list_models, pretrainable_models


def test_an_unknown_model_fails_before_anything_else_and_lists_the_known_ones():
    with pytest.raises(ValueError, match=f"unknown model 'nonexistent'; known models: {', '.join(list_models())}"):
        PretrainConfig(model="nonexistent").validate()
    with pytest.raises(ValueError, match="unknown model"):
        FinetuneConfig(model="nonexistent").validate()


def test_an_unknown_size_lists_the_models_sizes():
    with pytest.raises(ValueError, match="model 'hymamba' has no size 'huge'; its sizes: base, tiny"):
        PretrainConfig(size="huge").validate()


def test_a_model_that_cannot_be_pretrained_is_refused(monkeypatch):
    from mambamim.engine import config as config_module

    entry = dataclasses.replace(REGISTRY["vim_unetr"], pretrainable=False)
    monkeypatch.setattr(config_module, "get_entry", lambda name: entry)
    with pytest.raises(ValueError, match="cannot be pre-trained; pre-trainable models: " + ", ".join(pretrainable_models())):
        PretrainConfig(data="c", out="o", model="vim_unetr").validate()
    FinetuneConfig(data="c", out="o", model="vim_unetr").validate()  # fine-tuning does not need it


@pytest.mark.parametrize("side", [PATCH_SIZE + PATCH_SIZE // 2, PATCH_SIZE // 2, 0, 6 * PATCH_SIZE - 1])
def test_a_side_not_divisible_by_the_patch_size_is_refused(side):
    with pytest.raises(ValueError, match=f"crop must be a positive multiple of {PATCH_SIZE}"):
        PretrainConfig(data="c", out="o", crop=side).validate()
    with pytest.raises(ValueError, match=f"roi must be a positive multiple of {PATCH_SIZE}"):
        FinetuneConfig(data="c", out="o", roi=side).validate()
    PretrainConfig(data="c", out="o", crop=2 * PATCH_SIZE).validate()
    FinetuneConfig(data="c", out="o", roi=2 * PATCH_SIZE).validate()


def test_sparse_defaults_resolve_from_the_registry():
    assert resolve_sparse_full_res(PretrainConfig())
    assert not resolve_sparse_full_res(PretrainConfig(bottom_up=False))
    assert not resolve_sparse_full_res(PretrainConfig(model="vim_unetr"))
    assert resolve_sparse_full_res(PretrainConfig(model="mednext_cnn"))
    assert not resolve_sparse_full_res(PretrainConfig(sparse_full_res=False))
    assert resolve_sparse_levels(PretrainConfig()) == 1
    assert resolve_sparse_levels(PretrainConfig(compile=True, cuda_graphs=True)) == 2
    assert resolve_sparse_levels(PretrainConfig(compile=True, cuda_graphs=True, sparse_levels=1)) == 1


def test_pretrainer_spec_is_complete_and_explicit():
    cfg = PretrainConfig(data="c", out="o", size="tiny", in_channels=2, mask_ratio=0.6, token="learnable",
                         skip=False, scan="hilbert", decoder_width=16, sparse_levels=2)
    spec = cfg.pretrainer_spec()
    assert spec == {"name": "hymamba", "kwargs": dict(
        in_channels=2, mask_ratio=0.6, token="learnable", skip=False, bottom_up=True, scan="hilbert",
        sparse_full_res=True, sparse_levels=2, size="tiny", decoder_width=16)}
    assert "decoder_width" not in PretrainConfig(size="tiny").pretrainer_spec()["kwargs"]
    vim = PretrainConfig(model="vim_unetr", size="tiny").pretrainer_spec()
    assert vim["name"] == "vim_unetr" and vim["kwargs"]["sparse_full_res"] is False


@pytest.mark.parametrize("model", pretrainable_models())
def test_the_spec_builds_the_pretrainer_the_config_describes(model):
    from mambamim.pretrain import create_pretrainer

    cfg = PretrainConfig(data="c", out="o", model=model, size="tiny", mask_ratio=0.6, token="learnable",
                         scan="zigzag", decoder_width=16)
    spec = cfg.pretrainer_spec()
    pre = create_pretrainer(spec["name"], **spec["kwargs"])
    assert pre.name == model and pre.mask_ratio == 0.6 and pre.token == "learnable"
    assert pre.decoder.proj_bottleneck.out_channels == 16
    assert pre.sparse_full_res == resolve_sparse_full_res(cfg)
    x = torch.rand(1, 1, 2 * PATCH_SIZE, 2 * PATCH_SIZE, 2 * PATCH_SIZE)
    assert pre.random_mask(x).shape == (1, 2, 2, 2)
