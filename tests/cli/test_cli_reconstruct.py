"""``mambamim reconstruct`` on CPU: a stand-in pre-trainer for the figure path, real loaders for errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mambamim.cli.main import main

from _cli_toys import phantom_hu, write_nifti

AFF = np.diag([2.0, 2.0, 2.0, 1.0])


class EchoPretrainer(nn.Module):
    """Returns the input, per-patch normalised, as its reconstruction and records the mask it got."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.masks = []

    def forward(self, x, mask=None):
        from mambamim.pretrain.loss import patch_normalize

        self.masks.append(mask.clone())
        return {"loss": self.w * 0, "reconstruction": patch_normalize(x, 16), "mask": mask}


@pytest.fixture
def echo(monkeypatch):
    from mambamim.engine import inference

    model = EchoPretrainer()
    info = {"config": {}, "preprocessing": {"spacing": [2.0, 2.0, 2.0], "min_size": [32, 32, 32]},
            "crop": 32, "mask_ratio": 0.75, "in_channels": 1, "step": 1, "path": "x"}
    monkeypatch.setattr(inference, "load_pretrainer", lambda path, device="auto": (model, info))
    return model


def test_reconstruct_png_seeded(tmp_path, echo, capsys):
    img = write_nifti(tmp_path / "ct.nii.gz", phantom_hu((40, 36, 30)), AFF)
    outs = []
    for i, seed in enumerate([3, 3, 4]):
        out = tmp_path / f"fig{i}.png"
        assert main(["reconstruct", "--checkpoint", "ck", "--input", img, "--out", str(out), "--seed", str(seed),
                     "--device", "cpu", "--mask-ratio", "0.5"]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        outs.append(out)
    assert "wrote" in capsys.readouterr().out
    m = echo.masks
    assert m[0].shape == (1, 2, 2, 2) and int(m[0].sum()) == 4  # 8 tokens, half visible
    assert torch.equal(m[0], m[1])  # same seed, same mask
    assert not torch.equal(m[0], m[2]) and int(m[2].sum()) == 4


def test_reconstruct_errors(tmp_path, capsys):
    img = write_nifti(tmp_path / "ct.nii.gz", phantom_hu((40, 36, 30)), AFF)
    assert main(["reconstruct", "--checkpoint", str(tmp_path / "none.pt"), "--input", img, "--out", "x.png"]) == 2
    assert "not found" in capsys.readouterr().err
    enc = tmp_path / "encoder.pt"
    torch.save({"format": "mambamim-encoder", "encoder": {}}, enc)
    assert main(["reconstruct", "--checkpoint", str(enc), "--input", img, "--out", "x.png"]) == 2
    assert "checkpoints/last.pt" in capsys.readouterr().err
    fin = tmp_path / "best.pt"
    torch.save({"format": "mambamim-finetune", "model": {}}, fin)
    assert main(["reconstruct", "--checkpoint", str(fin), "--input", img, "--out", "x.png"]) == 2
    assert "not a mambamim pre-training checkpoint" in capsys.readouterr().err


def test_reconstruct_wrong_dimension_input(tmp_path, echo, capsys):
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((40, 36, 1), np.int16), AFF)
    assert main(["reconstruct", "--checkpoint", "ck", "--input", flat, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "flat.nii.gz" in err and "2D" in err
