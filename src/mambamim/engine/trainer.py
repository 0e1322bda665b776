"""The trainer every training run is: one class holds the loop, the step, logging, checkpointing,
resume, distributed setup and validation as named methods; pre-training and fine-tuning are small
subclasses (:class:`mambamim.engine.pretrain_loop.PretrainTrainer`,
:class:`mambamim.engine.finetune_loop.FinetuneTrainer`) that say what to build and what a step's
loss is.

The life of a run (``Trainer.train(config)``)::

    resolve --resume, validate, start the process group      train()
    claim the run folder, config.yaml, log, signals, data    open_run()
    read_dataset() -> build_loader() -> build_model()        setup()
      -> init_weights() -> optimiser / schedule -> resume()
      -> channels-last, DDP, compile -> after_setup()
    for each batch: train_step() -> log_train() -> on_step_end() (validate, checkpoint)   fit()
    final checkpoint, on_train_end()

To add a kind of training, subclass :class:`Trainer`, set ``kind``, ``unit`` and ``module_key``,
and implement ``build_loader``, ``build_model``, ``planned_steps``, ``compute_loss`` and
``probe_loss``; override the other hooks where the defaults do not fit.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mambamim.engine import distributed as D
from mambamim.engine.banner import precision_words, processes_words
from mambamim.engine.checkpoint import load_resume_checkpoint, save_checkpoint
from mambamim.engine.config import resolve_data, read_cache_meta
from mambamim.engine.logging_utils import MetricsWriter, RunLog
from mambamim.engine.loop import (
    StopSignal,
    TrainingInterrupted,
    TrainLoop,
    build_train_loop,
    seed_everything,
    window_peak_memory,
)
from mambamim.engine.run_folder import claim_run_folder, resolve_resume
from mambamim.runtime.compiling import CompiledOrEager
from mambamim.runtime.device import cudnn_benchmark

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "fast_forward", "prepare_for_training", "make_train_loader"]


class Trainer:
    """A training run of ``config`` on ``ctx`` (one process of a ``torchrun`` group, or the only one).

    Only rank 0 writes files; every rank runs every collective method (checkpoint, validation).
    Attributes set as the run goes: ``run`` (folder), ``cache`` and ``meta`` (the prepared data and
    its index), ``loader``, ``total`` (planned optimiser steps), ``loop`` (:class:`TrainLoop`:
    model, optimiser, step, data position), ``forward`` / ``prepare`` (the possibly compiled
    forward and its input layout), ``metrics``.
    """

    kind = "train"          # the progress bar's word for the run
    verb = "training"       # the start line's
    unit = "step"           # what one optimiser step is called in messages
    module_key = "model"    # the model's key in last.pt
    config_cls: type = object

    def __init__(self, config: Any, ctx: D.DistContext) -> None:
        self.config = config
        self.ctx = ctx
        self.run = Path(config.out)
        self.main = ctx.is_main
        self.resuming = bool(config.resume)
        self.cache: Path | None = None
        self.meta: dict[str, Any] = {}
        self.metrics: MetricsWriter | None = None
        self.pbar: Any = None
        self.rng: list[Any] | None = None
        self.window: list[float] = []
        self.batch_size = 0

    # ------------------------------------------------------------------------------ entry points

    @classmethod
    def train(cls, config: Any) -> Path:
        """Run (or resume, with ``config.resume``) the training ``config`` describes; returns the
        run folder. Resolves ``--resume``, validates, starts the process group and always tears it
        down."""
        config = resolve_resume(config, cls.config_cls)
        config.validate()
        ctx = D.init_distributed(config.device)
        trainer = None
        try:
            with cudnn_benchmark(ctx.device):
                trainer = cls(config, ctx)
                return trainer.execute()
        finally:
            # A trainer sits in reference cycles, so only the cyclic collector frees it. Under DDP it holds
            # the process group and the reducer's gloo work. Left to a later collection, or to the interpreter's
            # exit, that teardown can abort the process: "terminate called without an active exception", the
            # likely cause of a 2-process CI test's one SIGABRT. Free it while the group lives, then destroy it.
            del trainer
            gc.collect()
            D.cleanup(ctx)

    def execute(self) -> Path:
        """open_run, setup, fit; returns the run folder."""
        with self.open_run():
            self.setup()
            self.fit()
        return self.run

    # ------------------------------------------------------------------------------ the run folder

    @contextmanager
    def open_run(self) -> Iterator["Trainer"]:
        """Run folder and ``config.yaml`` (rank 0), log file, signal handling, seeding, and the data
        resolved to a cache whose index is read. On exit (normal or not) the signal handlers,
        progress bar, metrics writer and log are released.

        A new run refuses a folder that already holds a run unless ``config.overwrite``, which moves
        the earlier run into ``RUN/.overwritten-<timestamp>/`` first; every rank raises the same
        :class:`mambamim.engine.logging_utils.RunExistsError` (a ValueError).
        """
        config, ctx = self.config, self.ctx
        moved = claim_run_folder(self.run, config, self.main)
        if self.main:
            (self.run / "checkpoints").mkdir(parents=True, exist_ok=True)
            self.save_config()
        D.barrier()
        self.stop = StopSignal().__enter__()
        self.log = RunLog(self.run, enabled=self.main)
        if moved is not None:
            logger.warning("--overwrite: the earlier run in %s was moved aside to %s", self.run, moved)
        try:
            seed_everything(config.seed + ctx.rank)
            self.cache = resolve_data(config.data, self.run, workers=config.workers,
                                      progress=config.progress and self.main, is_main=self.main)
            D.barrier()
            self.meta = read_cache_meta(self.cache)
            yield self
        finally:
            self.stop.__exit__(None, None, None)
            if self.pbar is not None:
                self.pbar.close()
            if self.metrics is not None:
                self.metrics.close()
            self.log.close()

    def save_config(self) -> None:
        """``RUN/config.yaml``: the options with paths made absolute and the device actually used."""
        self.config.resolved(self.ctx.device).save_yaml(self.run / "config.yaml")

    @property
    def last_path(self) -> Path:
        return self.run / "checkpoints" / "last.pt"

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step, in the order the hooks depend on each other."""
        config, ctx = self.config, self.ctx
        self.read_dataset()
        if self.resuming:
            self.resume_path, self.resume_state = load_resume_checkpoint(self.run, map_location="cpu")
            self.match_global_batch(self.resume_state)
        self.loader = self.build_loader()
        self.total = self.planned_steps()
        model = self.build_model().to(ctx.device)
        self.init_weights(model)
        self.loop, self.warmup = build_train_loop(model, config, ctx, self.total, self.stop)
        if self.resuming:
            self.resume()
        crop = config.crop
        probe_x = torch.zeros(1, self.in_channels, crop, crop, crop, device=ctx.device)
        self.model, self.forward, self.prepare = prepare_for_training(
            self.loop, model, ctx, config, lambda m: self.probe_loss(m, probe_x))
        self.after_setup()
        if self.main:
            logger.info("%s", self.banner())
        self.metrics = MetricsWriter(self.run, enabled=self.main, resume_step=self.loop.step if self.resuming else None)

    def read_dataset(self) -> None:
        """Read what the run needs from ``self.meta`` (the cache index); sets ``in_channels``."""
        shapes = [c.get("shape") for c in self.meta.get("cases", []) if c.get("shape")]
        self.in_channels = int(shapes[0][0]) if shapes else int(getattr(self.config, "in_channels", 1))

    def build_loader(self) -> Any:
        raise NotImplementedError

    def planned_steps(self) -> int:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def init_weights(self, model: nn.Module) -> None:
        """Before the optimiser exists: e.g. load pre-trained weights (not called on resume's state)."""

    def after_setup(self) -> None:
        """After the model is wrapped and compiled, before the banner: e.g. validation data."""

    def banner(self) -> str:
        """The start line of the run, in words."""
        c = self.config
        return (f"{self.verb} {c.model} ({c.size}, {self.parameter_count() / 1e6:.2f} M parameters"
                f"{self.model_words()}) on {self.cache}: {self.schedule_words()}, {precision_words(self.loop.amp)}, "
                f"{processes_words(self.ctx.world_size, self.ctx.device)}")

    def model_words(self) -> str:
        return ""

    def schedule_words(self) -> str:
        return f"{self.total} {self.unit}s, warm-up {self.warmup} {self.unit}s"

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------------------ resume

    def match_global_batch(self, state: dict[str, Any]) -> None:
        """Resumed on another number of processes: change the per-process batch so that the global
        batch (crops per optimiser step over all processes) stays the run's.

        The sampler's order is one permutation per (seed, epoch), sharded by interleaving, and an item's
        crops and augmentation depend only on (seed, epoch, index): with the global batch kept, global
        batch b holds the same volumes on any number of processes, so the data position carries over.
        The per-rank random streams (e.g. the masks) cannot be mapped and restart from the seed.

        Raises:
            ValueError: the global batch does not split into whole volumes per process.
        """
        config, world = self.config, self.ctx.world_size
        saved_world = int(state.get("world_size") or len(state.get("rng") or []) or 1)
        if saved_world == world:
            return
        global_batch = config.batch_size * saved_world
        per_process, crops = global_batch // world, config.num_crops
        if global_batch % world or per_process % crops or per_process < crops:
            fits = [n for n in range(1, global_batch // crops + 1) if (global_batch // crops) % n == 0]
            raise ValueError(
                f"cannot resume {self.run} on {world} processes: its global batch of {global_batch} crops "
                f"({saved_world} processes x {config.batch_size}, {crops} crops per volume) does not split into "
                f"whole volumes per process; resume on {', '.join(map(str, fits))} processes")
        logger.warning("the run was trained on %d processes, this session has %d: %d crops per process instead of "
                       "%d keep the global batch at %d; the per-process random streams restart from the seed",
                       saved_world, world, per_process, config.batch_size, global_batch)
        config.batch_size = per_process
        if self.main:
            self.save_config()

    def resume(self) -> None:
        """Load ``RUN/checkpoints/last.pt`` (or the newest valid epoch checkpoint) into the loop; a
        run keeps the step total its schedule was planned for."""
        state, self.rng = self.loop.resume_from(self.resume_path, self.module_key, self.resume_state)
        self.resume_state = None  # the loop holds what it needs
        saved_total = state.get("total_steps")
        if saved_total and int(saved_total) != self.total:
            # e.g. --epochs on another number of processes: the restored schedule keeps the run's length
            logger.warning("this session would count %d %ss, the run was planned for %d (another number of "
                           "processes?): keeping the run's %d", self.total, self.unit, saved_total, saved_total)
            self.total = int(saved_total)
        self.on_resume(state)
        logger.info("resumed %s at %s %d (epoch %d, batch %d)", self.run, self.unit, self.loop.step,
                    self.loop.position.epoch, self.loop.position.batch)

    def on_resume(self, state: dict[str, Any]) -> None:
        """Take the subclass's own bookkeeping back from a resumed checkpoint."""

    # ------------------------------------------------------------------------------ the loop

    def session_end(self) -> int:
        """The step this session stops at: the run's total, or earlier with ``stop_after`` (read
        before the first step)."""
        stop_after = self.config.stop_after
        return self.total if stop_after is None else min(self.total, self.loop.step + stop_after)

    def fit(self) -> None:
        """Train from the loop's step to :attr:`end`; checkpoint at the end; a stop signal raises
        :class:`TrainingInterrupted` after its checkpoint."""
        loop, end = self.loop, self.session_end()
        if self.main and self.config.progress:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=self.total, initial=loop.step, desc=self.kind, unit=self.unit, dynamic_ncols=True)
        self.t_last = time.perf_counter()
        loop.model.train()
        batches = loop.batches(self.loader, self.rng, self.ctx.rank, self.ctx.world_size) if loop.step < end else iter(())
        for batch in batches:
            loss_value, grad_norm = self.train_step(batch)
            self.window.append(loss_value)
            self.last_loss = loss_value
            if self.pbar is not None:
                self.pbar.update(1)
            if self.should_log(end):
                self.log_train(grad_norm)
            self.on_step_end(end)
            if loop.step >= end or loop.stop_requested:
                break
        if loop.last_checkpoint_step != loop.step:
            self.checkpoint()
        if loop.stop_requested:
            raise TrainingInterrupted(f"stopped by a signal at {self.unit} {loop.step}/{self.total}; checkpoint "
                                      f"{self.last_path}; continue with --resume {self.run}")
        self.on_train_end()

    def train_step(self, batch: dict[str, Any]) -> tuple[float, float | None]:
        """One optimiser step on ``batch``; returns (loss averaged over ranks, gradient norm or None)."""
        with self.loop.autocast():
            loss = self.compute_loss(batch)
        return self.loop.backward_step(loss)

    def inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's image (B, C, D, H, W) on the device, in the forward's memory layout."""
        x = self.prepare(batch["image"].to(self.ctx.device, non_blocking=True))
        self.batch_size = int(x.shape[0])
        return x

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The scalar loss of ``batch`` (runs under the loop's autocast)."""
        raise NotImplementedError

    def probe_loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A scalar from one forward pass of ``x``: finds the parameters DDP sees no gradient for."""
        raise NotImplementedError

    def on_step_end(self, end: int) -> None:
        """After each step: validation and checkpoint cadence."""

    def on_train_end(self) -> None:
        """After the last step and its checkpoint."""

    # ------------------------------------------------------------------------------ logging

    def should_log(self, end: int) -> bool:
        step = self.loop.step
        return step % self.config.log_every == 0 or step == end

    def log_train(self, grad_norm: float | None) -> None:
        """One metrics row (mean loss of the window since the last row, lr, s/step, memory)."""
        now = time.perf_counter()
        sec = (now - self.t_last) / len(self.window)
        self.t_last = now
        loop = self.loop
        row = {"step": loop.step, "epoch": loop.position.epoch, "loss": sum(self.window) / len(self.window),
               "lr": loop.lr, "sec_per_step": sec, **self.row_extras(sec)}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        row.update(window_peak_memory(self.ctx.device))
        self.metrics.log(row, prefix="train/", phase="train")
        if self.pbar is not None:
            self.pbar.set_postfix(**self.postfix(row))
        self.window = []

    def row_extras(self, sec_per_step: float) -> dict[str, Any]:
        return {}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}"}

    # ------------------------------------------------------------------------------ checkpoints

    def checkpoint(self, periodic: bool = False) -> None:
        """Write ``last.pt`` (and ``epoch_NNNN.pt`` when ``periodic``); collective under DDP."""
        loop = self.loop
        state = loop.state_dict(self.module_key)  # collective
        if self.main:
            state.update({"total_steps": self.total, "world_size": self.ctx.world_size, "config": self.config.to_dict(),
                          "preprocessing": self.meta.get("preprocessing"), **self.checkpoint_extras()})
            save_checkpoint(self.last_path, state)
            if periodic:
                save_checkpoint(self.run / "checkpoints" / f"epoch_{loop.position.epoch:04d}.pt", state)
            self.after_checkpoint()
        loop.last_checkpoint, loop.last_checkpoint_step = self.last_path, loop.step
        D.barrier()

    def checkpoint_extras(self) -> dict[str, Any]:
        """What the subclass adds to ``last.pt`` (format, model description, bookkeeping)."""
        return {}

    def after_checkpoint(self) -> None:
        """Rank 0, after ``last.pt`` is written: e.g. the weights-only files users load."""


# ---------------------------------------------------------------------------------- acceleration


def fast_forward(
    model: nn.Module, device: torch.device, enabled: bool, memory_budget: float = 1.0, cuda_graphs: bool = False
) -> tuple[Callable, Callable]:
    """(forward, prepare_input): torch.compile and, on CUDA, channels-last 3D when ``enabled``; CUDA
    graphs with ``cuda_graphs`` on one CUDA device (elsewhere a warning, and plain compile).

    ``model`` (possibly DDP-wrapped) must already hold channels-last weights on CUDA (see
    :func:`prepare_for_training`). Checkpoints keep using the eager module's state.
    """
    if not enabled:
        return model, lambda x: x
    if cuda_graphs and (device.type != "cuda" or isinstance(model, nn.parallel.DistributedDataParallel)):
        logger.warning("CUDA graphs need one CUDA device without DDP; compiling without them")
        cuda_graphs = False
    prepare = (lambda x: x.contiguous(memory_format=torch.channels_last_3d)) if device.type == "cuda" else (lambda x: x)
    return CompiledOrEager(model, memory_budget=memory_budget, cuda_graphs=cuda_graphs), prepare


def _wrap_model(model: nn.Module, ctx: D.DistContext, setting: str, probe: Callable[[nn.Module], torch.Tensor]) -> nn.Module:
    if not ctx.distributed:
        return model
    setting = str(setting).lower()
    if setting == "auto":
        unused = D.has_unused_parameters(model, probe)
        if unused:
            logger.info("%d parameters get no gradient (e.g. %s): DDP with find_unused_parameters", len(unused), unused[0])
        find = bool(unused)
    else:
        find = setting == "true"
    return D.wrap_ddp(model, ctx, find_unused_parameters=find)


def prepare_for_training(loop: TrainLoop, model: nn.Module, ctx: D.DistContext, config: Any,
                         probe: Callable[[nn.Module], torch.Tensor]) -> tuple[nn.Module, Callable, Callable]:
    """channels-last (when compiling on CUDA), DDP wrap (into ``loop.model``) and the (compiled)
    forward. ``probe`` runs the model once on a dummy batch to find unused parameters.
    Returns (model, forward, prepare)."""
    if config.compile and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    loop.model = _wrap_model(model, ctx, config.find_unused_parameters, probe)
    forward, prepare = fast_forward(loop.model, ctx.device, config.compile, config.memory_budget,
                                    getattr(config, "cuda_graphs", False))
    return model, forward, prepare


def make_train_loader(cache: Path, config: Any, ctx: D.DistContext, labeled: bool, augment: bool,
                      case_ids: list[str] | None = None) -> Any:
    """The training loader of ``config`` over ``case_ids`` of ``cache`` (crops, batch, workers, seed; sharded
    under DDP; see :func:`mambamim.data.loaders.build_train_loader`)."""
    from mambamim.data.loaders import build_train_loader

    crop = config.crop
    return build_train_loader(
        cache,
        case_ids,
        crop_size=(crop, crop, crop),
        num_crops=config.num_crops,
        batch_size=config.batch_size // config.num_crops,
        labeled=labeled,
        augment=augment,
        num_workers=config.workers,
        seed=config.seed,
        distributed=ctx.distributed,
        # pinned batches make the host-to-GPU copy asynchronous: from pageable memory the host waits for
        # it while the GPU, drained by the step's host sync, sits idle
        pin_memory=ctx.device.type == "cuda",
    )
