"""The mechanics of one optimiser step and its resumable state, shared by every trainer.

:class:`TrainLoop` runs a step (AMP, clipping, NaN checks, one host sync), keeps the step count and
the data position, and saves / restores all of it, the random streams of every rank included, so
that a resumed run continues bit for bit. :class:`StopSignal` turns SIGINT / SIGTERM into a stop at
the next step boundary.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from mambamim.engine import distributed as D
from mambamim.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_resume_checkpoint,
    restore_rng_state,
)
from mambamim.engine.optim import build_optimizer
from mambamim.engine.schedule import (
    DataPosition,
    capture_loader_rng,
    default_warmup_steps,
    open_epoch,
    restore_loader_rng,
    warmup_cosine_scheduler,
)

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "StopSignal", "seed_everything", "TrainLoop",
           "build_train_loop", "window_peak_memory"]


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; training stopped before the update."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped training at a step boundary, after a checkpoint was written."""


class StopSignal:
    """While active, SIGINT and SIGTERM ask the training loop to stop at the next step boundary
    (with a checkpoint) instead of killing it mid-write; a second SIGINT stops at once.

    Only installs handlers in the main thread; elsewhere it is inert.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        logger.warning("%s received: stopping after this step with a checkpoint (Ctrl-C again to abort now)",
                       signal.Signals(signum).name)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - exotic platforms
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_train_loop(model: nn.Module, config: Any, ctx: D.DistContext, total: int,
                     stop: StopSignal) -> tuple["TrainLoop", int]:
    """AdamW, warm-up + cosine schedule over ``total`` steps, AMP and grad scaler around ``model``
    (already on ``ctx.device``). Returns (the loop, the warm-up steps)."""
    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup_steps(total)
    warmup = min(warmup, total)
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, warmup, total, config.min_lr_ratio)
    amp = D.resolve_amp(ctx.device, config.amp)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp == "fp16")
    loop = TrainLoop(model, optimizer, scheduler, scaler, ctx.device, amp, config.clip_grad or None)
    loop.stop = stop
    return loop, warmup


@dataclass
class TrainLoop:
    """The shared mechanics of a training run: one optimiser step with AMP, clipping and checks;
    resumable state (step, data position, RNG of every rank).

    Attributes:
        model: the (possibly DDP-wrapped) module being trained.
        optimizer, scheduler, scaler: as usual; the scheduler steps once per optimiser step.
        device, amp: where and in which precision the forward pass runs.
        clip_grad: max gradient norm (None / 0 disables).
        step: optimiser steps done; position: data position (epoch, batches consumed in it).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    device: torch.device
    amp: str
    clip_grad: float | None
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    last_checkpoint: Path | None = None
    last_checkpoint_step: int | None = None
    epoch_rng: dict[str, Any] | None = None
    loader: Any = None
    stop: StopSignal | None = None
    stop_requested: bool = False

    def capture_rng(self) -> dict[str, Any]:
        """Global generators plus the loader's own random state."""
        return {"global": capture_rng_state(),
                "loader": capture_loader_rng(self.loader) if self.loader is not None else None}

    def autocast(self):
        return D.autocast_context(self.device, self.amp)

    def backward_step(self, loss: torch.Tensor, what: str = "loss") -> tuple[float, float | None]:
        """Check ``loss`` (mean over ranks) is finite, back-propagate, clip, step optimiser,
        scaler and scheduler.

        Returns:
            (loss averaged over ranks, gradient norm before clipping or None).

        Raises:
            NonFiniteLossError: NaN / inf loss or gradient norm; no parameter was updated.
        """
        # One reduction carries the loss and "some rank was asked to stop", so all ranks agree. It is read
        # after the backward pass, with the gradient norm, in the step's one host sync: a sync before the
        # backward pass would idle the GPU while the host launches it. The update comes after the checks.
        flag = 1.0 if self.stop is not None and self.stop.requested is not None else 0.0
        # torch.full fills on the device; a tensor made from a Python number would be copied from the host,
        # and that copy waits for the forward pass, before the backward pass is launched.
        packed = torch.stack([loss.detach().float().reshape(()),
                              torch.full((), flag, dtype=torch.float32, device=loss.device)])
        packed = D.all_reduce_mean(packed)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        norm = None
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            packed = torch.cat([packed, norm.detach().float().reshape(1).to(packed.device)])
        values = packed.tolist()
        mean_loss, self.stop_requested = values[0], values[1] > 0
        if not math.isfinite(mean_loss):
            self._raise_non_finite(f"{what} is {mean_loss}")
        grad_norm: float | None = values[2] if norm is not None else None
        if grad_norm is not None and not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            self._raise_non_finite(f"gradient norm is {grad_norm} ({what} {mean_loss:.6g})")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.position.batch += 1
        return mean_loss, grad_norm

    def _raise_non_finite(self, what: str) -> None:
        where = f"step {self.step + 1} (epoch {self.position.epoch}, batch {self.position.batch + 1})"
        if self.last_checkpoint is not None:
            good = f"the last good checkpoint {self.last_checkpoint} (step {self.last_checkpoint_step}) is intact"
        else:
            good = "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"{what} at {where}: training stopped before the update; {good}. "
            "Try a lower --lr, --clip-grad, or --amp none; check the data for NaN."
        )

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self, module_key: str) -> dict[str, Any]:
        """Training state to checkpoint (collective under DDP: every rank must call it)."""
        rng = D.all_gather_objects({"now": self.capture_rng(), "epoch_start": self.epoch_rng})
        return {
            module_key: D.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "step": self.step,
            "position": self.position.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], module_key: str) -> list[Any] | None:
        """Restore model, optimiser, scheduler, scaler, step and position; returns the RNG state
        list (one per rank) to restore with :meth:`restore_rng` at the right moment."""
        D.unwrap(self.model).load_state_dict(state[module_key])
        # Keep this run's implementation (fused on CUDA) when the checkpoint comes from another device: the
        # saved groups carry theirs, and loading also places the step counters by it.
        saved = dict(state["optimizer"])
        saved["param_groups"] = [{**g, "fused": now.get("fused"), "foreach": now.get("foreach")}
                                 for g, now in zip(saved["param_groups"], self.optimizer.param_groups)]
        self.optimizer.load_state_dict(saved)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.position = DataPosition.from_state(state.get("position"))
        return state.get("rng")

    def resume_from(self, path: Path, module_key: str,
                    state: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any] | None]:
        """Load a checkpoint into this loop (see :meth:`load_state_dict`) and count it as the last
        checkpoint; returns (the checkpoint dict, its per-rank RNG list).

        ``path``: a checkpoint file, or a run folder: its ``checkpoints/last.pt``, or the newest valid
        ``checkpoints/epoch_NNNN.pt`` when last.pt is missing or damaged (see
        :func:`mambamim.engine.checkpoint.load_resume_checkpoint`). ``state``: that file, already loaded."""
        if state is None and Path(path).is_dir():
            path, state = load_resume_checkpoint(path, map_location="cpu")
        elif state is None:
            state = load_checkpoint(path, map_location="cpu")
        try:
            rng = self.load_state_dict(state, module_key)
        except (RuntimeError, ValueError, KeyError) as exc:
            # e.g. a run from before the skip blocks joined the encoder, or before A_log / D left weight decay
            raise CheckpointError(
                f"cannot resume from {path}: it does not fit this version's model or optimiser "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Start a new run; its encoder.pt "
                "still fine-tunes with --allow-partial") from None
        self.last_checkpoint, self.last_checkpoint_step = path, self.step
        return state, rng

    def restore_rng(self, rng: list[Any] | None, which: str, rank: int, world_size: int) -> bool:
        """Restore this rank's ``which`` ("now" or "epoch_start") generator state from a
        checkpoint's per-rank list; False when not possible (logged)."""
        if not rng:
            return False
        if len(rng) != world_size:
            logger.warning(
                "checkpoint was written by %d processes, this run has %d: random streams restart from the seed",
                len(rng),
                world_size,
            )
            return False
        state = rng[rank].get(which)
        if state is None:
            return False
        restore_rng_state(state["global"])
        if self.loader is not None:
            restore_loader_rng(self.loader, state.get("loader"))
        return True

    def batches(self, loader: Any, rng: list[Any] | None, rank: int, world_size: int) -> Iterator[Any]:
        """Endless batches from ``self.position`` on; ``self.position`` advances as
        :meth:`backward_step` runs, and rolls over to the next epoch when one is used up.

        With ``rng`` (from a checkpoint), the random streams are put back exactly where the
        interrupted run had them: at an epoch boundary before the epoch's iterator is created;
        mid-epoch, the epoch-start state is restored, the epoch's iterator recreated and the
        consumed batches replayed, then the checkpoint-time state restored. This is exact whatever
        randomness the sampler and dataset use with ``num_workers=0``. The cache loader
        (:func:`mambamim.data.loaders.build_train_loader`) makes its order a function of (seed,
        epoch) and each item a function of (seed, epoch, index): its consumed batches are skipped
        without loading them (``sampler.skip_next``), and resume is exact with any number of workers.
        """
        first = True
        self.loader = loader
        n = len(loader)
        if n == 0:
            raise ValueError("the training loader yields no batch (too few cases for the batch size?)")
        while True:
            if self.position.batch >= n:
                self.position = DataPosition(self.position.epoch + 1, 0)
            if first and rng:
                if self.position.batch == 0:
                    self.restore_rng(rng, "now", rank, world_size)
                else:
                    self.restore_rng(rng, "epoch_start", rank, world_size)
            if self.position.batch == 0 or not (first and rng):
                self.epoch_rng = self.capture_rng()
            elif world_size == len(rng):
                self.epoch_rng = rng[rank].get("epoch_start")
            iterator = open_epoch(loader, self.position.epoch, self.position.batch)
            if first and rng and self.position.batch > 0:
                self.restore_rng(rng, "now", rank, world_size)
            first = False
            for batch in iterator:
                yield batch
                if self.position.batch >= n:
                    break


def window_peak_memory(device: torch.device) -> dict[str, float]:
    """GPU memory for a metrics row: ``peak_mem_gib``, the most allocated since the last call (or the start),
    after which a new window begins, so later rows show the steady state without compile-time buffers;
    and ``reserved_gib``, what the caching allocator holds now. CUDA graphs replay into a pool allocated
    while they were recorded, so under them only the recording's window and ``reserved_gib`` show their
    memory. Empty off CUDA. Reads allocator counters only: no device sync."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_mem_gib": round(peak, 3), "reserved_gib": round(torch.cuda.memory_reserved(device) / 2**30, 3)}
