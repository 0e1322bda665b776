"""Tiny stand-in pre-trainer, segmentation net and loader for the engine tests (fast, deterministic
given the global RNG, with the same interfaces as the real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler


class TinyEncoder(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv3d(in_channels, width, 3, padding=1)
        self.proj = nn.Conv3d(width, width * 2, 1)

    def forward(self, x):  # (B, C, D, H, W) -> (B, 8, D/16, H/16, W/16)
        return self.proj(F.avg_pool3d(F.gelu(self.stem(x)), 16))


class _Up16(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 1)

    def forward(self, z):
        return F.interpolate(self.conv(z), scale_factor=16, mode="nearest")


class TinyPretrainer(nn.Module):
    """forward(x, mask=None) -> {"loss", "reconstruction", "mask"} with a random mask drawn from the
    global torch RNG (as the real pre-trainer does)."""

    def __init__(self, in_channels: int = 1, mask_ratio: float = 0.75, nan_at_call: int | None = None,
                 signal_at_call: int | None = None, **_):
        super().__init__()
        self.encoder = TinyEncoder(in_channels)
        self.decoder = _Up16(8, in_channels)
        self.mask_ratio = mask_ratio
        self.calls = 0
        self.nan_at_call = nan_at_call
        self.signal_at_call = signal_at_call

    def forward(self, x, mask=None):
        b, _, d, h, w = x.shape
        grid = (d // 16, h // 16, w // 16)
        if mask is None:
            mask = torch.rand(b, *grid, device=x.device) > self.mask_ratio
        up = mask[:, None].float().repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
        rec = self.decoder(self.encoder(x * up))
        hidden = 1.0 - up
        loss = ((rec.float() - x) ** 2 * hidden).sum() / hidden.sum().clamp_min(1.0)
        self.calls += 1
        if self.signal_at_call is not None and self.calls == self.signal_at_call:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "reconstruction": rec, "mask": mask}


class TinySegNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 3, **_):
        super().__init__()
        self.encoder = TinyEncoder(in_channels)
        self.head = nn.Conv3d(in_channels, num_classes, 1)
        self.up = _Up16(8, num_classes)

    def forward(self, x):
        return self.head(x) + self.up(self.encoder(x))


class RandomCrops(Dataset):
    """Volumes drawn at construction; each item is a random crop chosen with the global torch RNG."""

    def __init__(self, n: int = 6, crop: int = 16, size: int = 24, labeled: bool = False) -> None:
        g = torch.Generator().manual_seed(123)
        self.vols = torch.rand(n, 1, size, size, size, generator=g)
        self.crop, self.size, self.labeled = crop, size, labeled

    def __len__(self):
        return len(self.vols)

    def __getitem__(self, i):
        o = torch.randint(0, self.size - self.crop + 1, (3,))
        c = self.crop
        img = self.vols[i][:, o[0]:o[0] + c, o[1]:o[1] + c, o[2]:o[2] + c]
        out = {"image": img}
        if self.labeled:
            out["label"] = (img > 0.5).long()
        return out


def make_loader(crop: int, batch_size: int, n: int = 6, labeled: bool = False, distributed: bool = False):
    ds = RandomCrops(n=n, crop=crop, size=crop + 8, labeled=labeled)
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        return DataLoader(ds, batch_size=batch_size, sampler=DistributedSampler(ds, shuffle=True, seed=0), drop_last=True)
    return DataLoader(ds, batch_size=batch_size, sampler=RandomSampler(ds), drop_last=True)


def fake_cache(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "format": "mambamim-cache", "version": 1, "preprocessing": {"spacing": [1.5, 1.5, 1.5]},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "cases": [{"id": f"c{i}", "split": None, "label": f"cases/c{i}/label.npy", "shape": [1, 24, 24, 24]}
                  for i in range(n)],
    }))
    return root


def patch_pretrain(monkeypatch, nan_at_call=None, signal_at_call=None):
    from mambamim.engine import pretrain_loop

    monkeypatch.setattr(pretrain_loop.PretrainTrainer, "build_model",
                        lambda self: TinyPretrainer(self.config.in_channels, self.config.mask_ratio,
                                                    nan_at_call=nan_at_call, signal_at_call=signal_at_call))
    monkeypatch.setattr(pretrain_loop, "make_train_loader",
                        lambda cache, cfg, ctx, labeled, augment, case_ids=None:
                        make_loader(cfg.crop, cfg.batch_size, labeled=labeled, distributed=ctx.distributed))
    monkeypatch.setattr(pretrain_loop.PretrainTrainer, "preview_volume", lambda self: None)


def patch_finetune(monkeypatch):
    from mambamim.engine import finetune_loop

    monkeypatch.setattr(finetune_loop, "_make_model", lambda spec: TinySegNet(spec["kwargs"]["in_channels"],
                                                                                spec["kwargs"]["num_classes"]))
    monkeypatch.setattr(finetune_loop, "make_train_loader",
                        lambda cache, cfg, ctx, labeled, augment, case_ids=None:
                        make_loader(cfg.crop, cfg.batch_size, labeled=labeled, distributed=ctx.distributed))


def make_tiny_cache(root: Path, num: int = 3) -> Path:
    """A real prepared cache of ``num`` small synthetic labeled phantoms (8 mm voxels, >= 32^3)."""
    from mambamim.data.prepare import prepare_dataset
    from mambamim.data.preprocess import PreprocessParams
    from mambamim.data.synth import synth_dataset

    synth_dataset(str(root / "raw"), num=num, seed=0, inplane_voxels=(40, 48), inplane_spacing=(8.0, 9.0),
                  slice_spacing=(8.0, 9.0))
    prepare_dataset(root / "raw", root / "cache", PreprocessParams(spacing=(8, 8, 8), min_size=(32, 32, 32)),
                    workers=1, progress=False)
    return root / "cache"
