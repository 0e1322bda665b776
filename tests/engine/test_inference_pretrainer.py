"""Pre-trainers and encoders rebuilt from checkpoints are exactly what was trained: built from the saved
``pretrainer_spec`` (or an older checkpoint's saved configuration), never from assumed defaults."""

from __future__ import annotations

import pytest
import torch

from mambamim.engine.checkpoint import CheckpointError, save_checkpoint
from mambamim.engine.config import PretrainConfig
from mambamim.engine.inference import load_pretrained_encoder, load_pretrainer, pretrainer_spec_of
from mambamim.pretrain import pretrainer_from_spec

# every setting away from its default, so a rebuild from defaults could not pass
NON_DEFAULT = dict(size="tiny", token="learnable", mask_ratio=0.6, scan="zigzag", decoder_width=24, crop=32,
                   in_channels=2, skip=True, sparse_levels=2)


def _config(tmp_path, **kw) -> PretrainConfig:
    cfg = PretrainConfig(data=str(tmp_path / "cache"), out=str(tmp_path / "run"), **{**NON_DEFAULT, **kw})
    cfg.validate()
    return cfg


def _trained(cfg: PretrainConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = pretrainer_from_spec(cfg.pretrainer_spec())
    with torch.no_grad():  # weights no fresh build has
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def _write_run(tmp_path, cfg, model, *, with_spec=True, ddp=False):
    run = tmp_path / "run"
    state = {f"module.{k}" if ddp else k: v for k, v in model.state_dict().items()}
    extra = {"pretrainer_spec": cfg.pretrainer_spec()} if with_spec else {}
    save_checkpoint(run / "checkpoints" / "last.pt", {
        "format": "mambamim-pretrain", "version": 1, "pretrainer": state, "config": cfg.to_dict(), "step": 7,
        "preprocessing": {"spacing": [1.5, 1.5, 2.0]}, **extra})
    save_checkpoint(run / "encoder.pt", {
        "format": "mambamim-encoder", "version": 1, "encoder": model.encoder.state_dict(), "config": cfg.to_dict(),
        "model": {"name": cfg.model, "kwargs": {"in_channels": cfg.in_channels, "scan": cfg.scan, "size": cfg.size}},
        "step": 7, **extra})
    return run


def _same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("with_spec", [True, False], ids=["spec", "older-config-only"])
@pytest.mark.parametrize("model", ["hymamba", "vim_unetr"])
def test_a_pretrainer_round_trips_to_an_identical_module(tmp_path, with_spec, model):
    cfg = _config(tmp_path, model=model, **({"sparse_levels": None} if model == "vim_unetr" else {}))
    trained = _trained(cfg)
    run = _write_run(tmp_path, cfg, trained, with_spec=with_spec, ddp=not with_spec)
    for source in (run, run / "checkpoints" / "last.pt"):
        loaded, info = load_pretrainer(source, device="cpu")
        assert type(loaded) is type(trained)
        _same_module(loaded, trained)
        assert loaded.mask_ratio == 0.6 and loaded.token == "learnable" and loaded.in_channels == 2
        assert loaded.decoder.proj_bottleneck.out_channels == 24
        assert loaded.sparse_levels == trained.sparse_levels and loaded.sparse_full_res == trained.sparse_full_res
        assert info["spec"] == cfg.pretrainer_spec() and info["crop"] == 32 and info["mask_ratio"] == 0.6
        assert info["step"] == 7 and info["preprocessing"] == {"spacing": [1.5, 1.5, 2.0]}
        x = torch.rand(2, 2, 32, 32, 32)
        mask = trained.random_mask(x, torch.Generator().manual_seed(1))
        with torch.no_grad():
            want, got = trained(x, mask), loaded(x, mask)
        assert torch.equal(want["reconstruction"], got["reconstruction"]) and torch.equal(want["loss"], got["loss"])


def test_the_saved_spec_wins_over_the_configuration(tmp_path):
    cfg = _config(tmp_path)
    trained = _trained(cfg)
    run = _write_run(tmp_path, cfg, trained)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["config"]["scan"] = "raster"  # a spec says exactly what was built; the config is only the fallback
    assert pretrainer_spec_of(ckpt)["kwargs"]["scan"] == "zigzag"
    del ckpt["pretrainer_spec"]
    assert pretrainer_spec_of(ckpt)["kwargs"]["scan"] == "raster"
    with pytest.raises(CheckpointError, match="neither a pretrainer_spec nor"):
        pretrainer_spec_of({"format": "mambamim-pretrain"})
    ckpt["config"]["model"] = "resnet"
    with pytest.raises(CheckpointError, match="unknown model"):
        pretrainer_spec_of(ckpt)


@pytest.mark.parametrize("with_spec", [True, False], ids=["spec", "older-config-only"])
def test_the_encoder_loads_from_encoder_pt_last_pt_or_the_run(tmp_path, with_spec):
    cfg = _config(tmp_path)
    trained = _trained(cfg)
    run = _write_run(tmp_path, cfg, trained, with_spec=with_spec)
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        want = trained.encoder(x)
    for source in (run, run / "encoder.pt", run / "checkpoints" / "last.pt"):
        encoder = load_pretrained_encoder(source)
        assert not encoder.training and encoder.mamba.scan.order == "zigzag" and encoder.in_channels == 2
        _same_module(encoder, trained.encoder)
        with torch.no_grad():
            got = encoder(x)
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_encoder_pt_is_not_a_pretrainer_and_mismatched_weights_are_named(tmp_path):
    cfg = _config(tmp_path)
    run = _write_run(tmp_path, cfg, _trained(cfg))
    with pytest.raises(CheckpointError, match="checkpoints/last.pt"):
        load_pretrainer(run / "encoder.pt", device="cpu")
    ckpt = torch.load(run / "encoder.pt", weights_only=True)
    ckpt["pretrainer_spec"] = {"name": "hymamba", "kwargs": {**cfg.pretrainer_spec()["kwargs"], "size": "mini"}}
    save_checkpoint(tmp_path / "wrong.pt", ckpt)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_pretrained_encoder(tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError):
        load_pretrained_encoder(tmp_path / "nowhere")
