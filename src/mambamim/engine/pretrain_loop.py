"""MambaMIM pre-training: :class:`PretrainTrainer`, the :class:`mambamim.engine.trainer.Trainer`
whose step is the masked-reconstruction loss, and :func:`pretrain`, its entry point.

Run folder::

    RUN/config.yaml            resolved PretrainConfig
    RUN/log.txt                log records of this package
    RUN/metrics.csv            step, epoch, loss, lr, grad_norm, sec_per_step, peak_mem_gib, reserved_gib (CUDA), ...
    RUN/tensorboard/           TensorBoard events
    RUN/checkpoints/last.pt    full training state (atomic); epoch_NNNN.pt every save_every epochs
    RUN/encoder.pt             encoder weights + model name/kwargs + config, for fine-tuning
    RUN/reconstructions/       masked input / reconstruction / original PNGs of a fixed volume
    RUN/cache/                 the prepared data, when --data was raw NIfTI / DICOM
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mambamim.engine import distributed as D
from mambamim.engine.checkpoint import save_checkpoint
from mambamim.engine.config import PATCH_SIZE, PretrainConfig, model_size_kwargs, read_cache_meta
from mambamim.engine.loop import NonFiniteLossError, TrainingInterrupted, TrainLoop
from mambamim.engine.schedule import DataPosition
from mambamim.engine.trainer import Trainer, make_train_loader

logger = logging.getLogger(__name__)

__all__ = ["pretrain", "PretrainTrainer", "NonFiniteLossError", "TrainingInterrupted"]


def _fixed_volume(cache: Path, case_ids: list[str] | None, crop: int) -> torch.Tensor | None:
    """A centre crop (1, C, crop, crop, crop) of the first case, zero-padded if smaller."""
    try:
        from mambamim.data.loaders import build_eval_dataset

        meta = read_cache_meta(cache)
        ids = case_ids or [str(c.get("id", c.get("case_id"))) if isinstance(c, dict) else str(c) for c in meta.get("cases", [])]
        if not ids:
            return None
        item = build_eval_dataset(cache, ids[:1])[0]
        image = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
    except Exception as exc:  # visualisation must never stop training
        logger.warning("no reconstruction previews: could not load a fixed volume (%s)", exc)
        return None
    out = torch.zeros(image.shape[0], crop, crop, crop)
    src, dst = [], []
    for size in image.shape[1:]:
        take = min(size, crop)
        s0 = (size - take) // 2
        d0 = (crop - take) // 2
        src.append(slice(s0, s0 + take))
        dst.append(slice(d0, d0 + take))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out[None]


def _render_preview(model: nn.Module, volume: torch.Tensor, mask_ratio: float, seed: int, path: Path, loop: TrainLoop) -> Path | None:
    try:
        from mambamim.masking.masks import random_bottleneck_mask
        from mambamim.pretrain.visualize import render_reconstruction
    except ImportError as exc:
        logger.debug("reconstruction previews unavailable: %s", exc)
        return None
    module = D.unwrap(model)
    was_training = module.training
    try:
        x = volume.to(loop.device)
        grid = [s // PATCH_SIZE for s in x.shape[2:]]
        gen = torch.Generator().manual_seed(seed)
        mask = random_bottleneck_mask(1, grid, mask_ratio, generator=gen, device=loop.device)
        module.eval()
        devices = [loop.device.index or 0] if loop.device.type == "cuda" else []
        # the picture must not shift the training's random streams (exact resume)
        with torch.random.fork_rng(devices=devices), torch.no_grad(), loop.autocast():
            out = module(x, mask=mask)
        path.parent.mkdir(parents=True, exist_ok=True)
        render_reconstruction(x.float().cpu(), out["reconstruction"].float().cpu(), out["mask"].cpu(), path)
        return path
    except Exception as exc:  # never stop training for a picture
        logger.warning("could not render the reconstruction preview %s: %s", path, exc)
        return None
    finally:
        module.train(was_training)


class PretrainTrainer(Trainer):
    """MambaMIM pre-training: the loss is the pre-trainer's masked-reconstruction loss; every epoch
    ends with a checkpoint, ``encoder.pt`` and (every ``vis_every`` epochs) a reconstruction
    preview of a fixed volume."""

    kind, verb, unit, module_key = "pretrain", "pre-training", "step", "pretrainer"
    config_cls = PretrainConfig

    def read_dataset(self) -> None:
        super().read_dataset()
        config = self.config
        if self.in_channels != config.in_channels and self.meta.get("cases"):
            logger.info("the cache has %d channel(s): in_channels %d -> %d", self.in_channels, config.in_channels,
                        self.in_channels)
            config.in_channels = self.in_channels
            if self.main:
                self.save_config()
        self.in_channels = config.in_channels

    def build_loader(self) -> Any:
        return make_train_loader(self.cache, self.config, self.ctx, labeled=False, augment=True, case_ids=self.config.cases)

    def planned_steps(self) -> int:
        config = self.config
        self.steps_per_epoch = len(self.loader)
        return config.steps if config.steps is not None else config.epochs * self.steps_per_epoch

    def build_model(self) -> nn.Module:
        from mambamim.pretrain import pretrainer_from_spec

        return pretrainer_from_spec(self.config.pretrainer_spec())

    def after_setup(self) -> None:
        config = self.config
        self.model_info = {
            "name": config.model,
            "kwargs": {"in_channels": config.in_channels, "scan": config.scan, **model_size_kwargs(config.size)},
        }
        self.preview = self.preview_volume() if self.main and config.vis_every else None

    def preview_volume(self) -> torch.Tensor | None:
        """The fixed volume of the reconstruction previews, or None."""
        return _fixed_volume(self.cache, self.config.cases, self.config.crop)

    def schedule_words(self) -> str:
        return f"{self.total} steps ({self.steps_per_epoch} per epoch), warm-up {self.warmup} steps"

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.forward(self.inputs(batch))["loss"]

    def probe_loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)["loss"]

    def epoch_done(self) -> bool:
        return self.loop.position.batch >= self.steps_per_epoch

    def should_log(self, end: int) -> bool:
        return super().should_log(end) or self.epoch_done()

    def row_extras(self, sec_per_step: float) -> dict[str, Any]:
        return {"crops_per_s": self.batch_size * self.ctx.world_size / max(sec_per_step, 1e-9)}

    def on_step_end(self, end: int) -> None:
        loop, config = self.loop, self.config
        if self.epoch_done():
            epoch = loop.position.epoch
            loop.position = DataPosition(epoch + 1, 0)
            self.checkpoint(periodic=bool(config.save_every) and (epoch + 1) % config.save_every == 0)
            if self.main:
                logger.info("epoch %d done at step %d/%d, loss %.4f", epoch, loop.step, self.total, self.last_loss)
            if self.preview is not None and ((epoch + 1) % config.vis_every == 0 or loop.step >= end):
                self.render_preview(f"epoch_{epoch + 1:04d}.png")
        elif config.checkpoint_steps and loop.step % config.checkpoint_steps == 0 and loop.step < end:
            self.checkpoint()

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"format": "mambamim-pretrain", "version": 1, "model": self.model_info,
                "pretrainer_spec": self.config.pretrainer_spec()}

    def after_checkpoint(self) -> None:
        save_checkpoint(self.run / "encoder.pt", {
            "format": "mambamim-encoder", "version": 1,
            "encoder": D.unwrap(self.loop.model).encoder.state_dict(),
            "model": self.model_info, "pretrainer_spec": self.config.pretrainer_spec(),
            "config": self.config.to_dict(), "step": self.loop.step,
            "preprocessing": self.meta.get("preprocessing"),
        })

    def render_preview(self, name: str) -> None:
        _render_preview(self.loop.model, self.preview, self.config.mask_ratio, self.config.seed,
                        self.run / "reconstructions" / name, self.loop)

    def on_train_end(self) -> None:
        loop, run = self.loop, self.run
        if self.preview is not None and not (run / "reconstructions").exists():
            self.render_preview(f"step_{loop.step:07d}.png")
        if self.main:
            done = "finished" if loop.step >= self.total else \
                f"stopped at step {loop.step}/{self.total} (resume with --resume {run})"
            logger.info("pre-training %s; encoder weights in %s", done, run / "encoder.pt")


def pretrain(config: PretrainConfig) -> Path:
    """Run (or resume, with ``config.resume``) MambaMIM pre-training; returns the run folder.

    Under ``torchrun`` every process calls this; only rank 0 writes files.

    Raises:
        NonFiniteLossError: the loss became NaN / inf (the last checkpoint stays intact).
        TrainingInterrupted: SIGINT / SIGTERM, after a checkpoint.
        FileNotFoundError / ValueError: bad data path or options.
    """
    return PretrainTrainer.train(config)
