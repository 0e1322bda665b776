"""Checkpoint files, RNG capture, encoder transfer report, model rebuild."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine_standins import TinyPretrainer, TinySegNet
from mambamim.engine import checkpoint as C
from mambamim.engine.checkpoint import (
    CheckpointError,
    EncoderMismatchError,
    capture_rng_state,
    load_checkpoint,
    load_encoder_weights,
    read_pretrained_weights,
    restore_rng_state,
    save_checkpoint,
)


def test_save_load_roundtrip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    state = {"w": torch.arange(5.0), "step": 3, "nested": {"a": [1, 2]}}
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3 and back["nested"] == {"a": [1, 2]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def crashing_save(obj, handle, *a, **k):
        handle.write(b"PK\x03\x04 partial garbage")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(C.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file removed


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.randn(100, 100)})
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="trunc.pt.*(corrupt|truncated)"):
        load_checkpoint(trunc)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt.*empty"):
        load_checkpoint(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)


def test_rng_capture_restore_all_generators(tmp_path):
    state = capture_rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})  # must survive weights_only loading
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert first == again


def test_encoder_report_exact_match_loads_everything():
    pre, seg = TinyPretrainer(), TinySegNet()
    report = load_encoder_weights(seg, pre.state_dict())  # "encoder." keys picked, decoder ignored
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert len(report.ignored) == len([k for k in pre.state_dict() if not k.startswith("encoder.")]) > 0
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(seg.encoder.state_dict()[k], v)


def test_encoder_report_missing_unexpected_mismatched_refused_then_partial():
    seg = TinySegNet()
    weights = {k: v.clone() + 1.0 for k, v in TinyPretrainer().encoder.state_dict().items()}
    weights.pop("stem.bias")                              # missing
    weights["extra.weight"] = torch.zeros(2)              # unexpected
    weights["proj.weight"] = torch.zeros(8, 4, 3, 1, 1)   # shape mismatch
    original = {k: v.clone() for k, v in seg.encoder.state_dict().items()}
    with pytest.raises(EncoderMismatchError) as err:
        load_encoder_weights(seg, weights)
    msg = str(err.value)
    assert "stem.bias" in msg and "extra.weight" in msg and "proj.weight: (8, 4, 3, 1, 1) vs (8, 4, 1, 1, 1)" in msg
    assert "--allow-partial" in msg
    for k, v in seg.encoder.state_dict().items():  # refused: nothing changed
        assert torch.equal(v, original[k])
    # a shape mismatch is refused even when strict=False
    with pytest.raises(EncoderMismatchError):
        load_encoder_weights(seg, weights, strict=False)
    report = load_encoder_weights(seg, weights, allow_partial=True)
    assert report.missing == ["stem.bias"] and report.unexpected == ["extra.weight"]
    assert [m[0] for m in report.mismatched] == ["proj.weight"]
    assert set(report.loaded) == {"stem.weight", "proj.bias"}
    assert torch.equal(seg.encoder.stem.weight, weights["stem.weight"])
    assert torch.equal(seg.encoder.proj.weight, original["proj.weight"])  # mismatched one untouched
    assert not report.ok


def test_pretrained_encoder_from_files(tmp_path):
    pre = TinyPretrainer()
    save_checkpoint(tmp_path / "encoder.pt", {"format": "mambamim-encoder", "encoder": pre.encoder.state_dict(),
                                              "model": {"name": "tiny", "kwargs": {}}})
    weights, meta = read_pretrained_weights(tmp_path)  # run folder -> encoder.pt
    assert meta["model"]["name"] == "tiny" and meta["path"].endswith("encoder.pt")
    assert load_encoder_weights(TinySegNet(), weights).ok
    # a DDP-prefixed full pre-training checkpoint works too
    save_checkpoint(tmp_path / "last.pt", {"pretrainer": {f"module.{k}": v for k, v in pre.state_dict().items()}})
    weights, _ = read_pretrained_weights(tmp_path / "last.pt")
    assert load_encoder_weights(TinySegNet(), weights).ok
    save_checkpoint(tmp_path / "other.pt", {"format": "x", "note": "no weights"})
    with pytest.raises(CheckpointError, match="other.pt"):
        read_pretrained_weights(tmp_path / "other.pt")


def test_model_from_checkpoint_rebuilds_network(tmp_path):
    from mambamim.models import create_model, model_config

    kwargs = model_config("hymamba", "tiny", in_channels=1, num_classes=3, scan="raster")
    model = create_model("hymamba", **kwargs)
    labels = {"0": "background", "1": "liver", "2": "spleen"}
    save_checkpoint(tmp_path / "best.pt", {"format": "mambamim-finetune", "model": model.state_dict(),
                                           "model_config": {"name": "hymamba", "kwargs": kwargs}, "labels": labels,
                                           "preprocessing": {"spacing": [1.5, 1.5, 1.5]}, "roi_size": [32, 32, 32]})
    rebuilt, info = C.model_from_checkpoint(tmp_path / "best.pt")
    assert info["class_names"] == ["background", "liver", "spleen"] and info["num_classes"] == 3
    assert info["preprocessing"] == {"spacing": [1.5, 1.5, 1.5]} and not rebuilt.training
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    save_checkpoint(tmp_path / "enc.pt", {"format": "mambamim-encoder", "encoder": {}})
    with pytest.raises(CheckpointError, match="no model configuration"):
        C.model_from_checkpoint(tmp_path / "enc.pt")
