"""MambaMIM pre-training loop (one process, one GPU, or ``torchrun`` DDP) with exact resume.

Run folder::

    RUN/config.yaml            resolved PretrainConfig
    RUN/log.txt                log records of this package
    RUN/metrics.csv            step, epoch, loss, lr, grad_norm, sec_per_step, peak_mem_gib, reserved_gib (CUDA), ...
    RUN/tensorboard/           TensorBoard events
    RUN/checkpoints/last.pt    full training state (atomic); epoch_NNNN.pt every save_every epochs
    RUN/encoder.pt             encoder weights + model name/kwargs + config, for fine-tuning
    RUN/reconstructions/       masked input / reconstruction / original PNGs of a fixed volume
    RUN/cache/                 the prepared data, when --data was raw NIfTI / DICOM

The shared training mechanics (optimiser, step, checks, resume state) live here and are used by
the fine-tuning loop too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

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
    save_checkpoint,
)
from mambamim.runtime.compiling import CompiledOrEager
from mambamim.engine.config import PretrainConfig, model_size_kwargs, read_cache_meta, resolve_data
from mambamim.engine.banner import precision_words, processes_words
from mambamim.engine.logging_utils import MetricsWriter, RunExistsError, RunLog, check_run_folder, move_run_aside
from mambamim.engine.schedule import (
    DataPosition,
    capture_loader_rng,
    default_warmup_steps,
    open_epoch,
    restore_loader_rng,
    warmup_cosine_scheduler,
)

logger = logging.getLogger(__name__)

__all__ = [
    "pretrain",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "StopSignal",
    "seed_everything",
    "build_optimizer",
    "TrainLoop",
    "resolve_resume",
    "run_training",
    "RunSession",
    "open_run",
    "build_train_loop",
]


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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on the conv / linear weights and none on the parameters that must
    not be pulled towards 0.

    A trainable parameter gets no decay when (the first rule that applies names it in the log):

    1. it carries ``param._no_weight_decay = True`` (the Mamba mixer's A_log, D, A_b_log, D_b:
       decaying A_log drifts the state decay rates towards A = -1);
    2. a module's ``no_weight_decay()`` method returns its name (timm convention, names relative to
       that module, dotted names allowed);
    3. a module's ``_no_weight_decay`` attribute lists its name (same; ``True``: all of the
       module's own parameters);
    4. it is 0/1-d (norm weights, biases, 1-d tokens), is a bias, or is a token (``*token``,
       ``*tokens.N``) of any shape.

    Frozen parameters (``requires_grad`` False, e.g. fixed positional embeddings) are left out.
    """
    listed = _listed_no_decay(model)
    decay, no_decay = [], []
    reasons: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        reason = _no_decay_reason(name, param, listed)
        if reason is None:
            decay.append(param)
        else:
            no_decay.append(param)
            reasons[reason] = reasons.get(reason, 0) + 1
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    logger.info("AdamW: weight decay %g on %d tensors (%d values), none on %d tensors (%d values; %s)",
                weight_decay, len(decay), sum(p.numel() for p in decay), len(no_decay),
                sum(p.numel() for p in no_decay), ", ".join(f"{n} {r}" for r, n in reasons.items()) or "-")
    # On CUDA the fused kernel: one pass over the parameters and their states per step (the step benchmarks
    # use it too); elsewhere PyTorch's default implementation.
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


def _listed_no_decay(model: nn.Module) -> set[int]:
    """ids of the parameters that some module of ``model`` lists as no-decay (rules 2 and 3 of
    :func:`build_optimizer`). By identity, so shared parameters and modules need no name bookkeeping."""
    ids: set[int] = set()
    for prefix, module in model.named_modules():
        # looked up on the class: a submodule called "no_weight_decay" is callable too, and would run forward
        method = getattr(type(module), "no_weight_decay", None)
        names = list(method(module)) if callable(method) else []
        attr = getattr(module, "_no_weight_decay", None)
        if attr is True:
            names += [n for n, _ in module.named_parameters(recurse=False)]
        elif isinstance(attr, str):
            names.append(attr)
        elif attr:
            names += list(attr)
        for name in names:
            try:
                ids.add(id(module.get_parameter(name)))
            except AttributeError:  # timm lists may name buffers or absent parameters
                logger.debug("no-weight-decay name %r is not a parameter of %s", name, prefix or "the model")
    return ids


def _no_decay_reason(name: str, param: nn.Parameter, listed: set[int]) -> str | None:
    """Why ``param`` (called ``name`` in the model) gets no weight decay; None: it gets decay."""
    if getattr(param, "_no_weight_decay", False):
        return "marked"
    if id(param) in listed:
        return "listed"
    parts = name.split(".")
    if param.ndim <= 1 or parts[-1] == "bias":
        return "0/1-d or bias"
    owner = parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]  # ParameterList entries
    if owner.endswith(("token", "tokens")):
        return "token"
    return None


# Options of the session, not of the run: on resume they always come from the resuming command.
SESSION_OPTIONS = ("stop_after", "progress", "resume", "overwrite")
# Options that change neither the maths nor the data: an explicit value may change them on resume.
BOOKKEEPING_OPTIONS = ("log_every", "checkpoint_steps", "save_every", "vis_every")


def resolve_resume(config: Any, config_cls: type, explicit: Collection[str] | None = None) -> Any:
    """For ``config.resume = RUN``: the run's saved configuration (``RUN/config.yaml``) with the
    options allowed to change on resume taken from ``config``.

    ``explicit`` None (the Python API): every option of ``config_cls.RESUME_OVERRIDABLE`` (device,
    workers, stop_after, progress, ...) comes from ``config``. ``explicit`` given (the command line:
    the options the user typed): the saved value of every option is kept unless it is named there;
    a named option that may change on resume (``RESUME_OVERRIDABLE`` and bookkeeping such as
    ``log_every``) takes ``config``'s value, and one that would change the training (lr, crop, data,
    ...) is refused when it differs from the saved value. ``stop_after`` and ``progress`` belong to
    the session and always come from ``config``.

    Raises:
        FileNotFoundError: RUN has no config.yaml, or no checkpoint at all.
        ValueError: an explicit option that cannot change on resume differs from the saved one.
    """
    if not config.resume or getattr(config, "_resume_resolved", False):
        return config
    run = Path(config.resume)
    saved = config_cls.load_yaml(run / "config.yaml")
    folder = run / "checkpoints"
    if not (folder / "last.pt").exists() and not any(folder.glob("epoch_*.pt")):
        raise FileNotFoundError(f"cannot resume {run}: no checkpoint in {folder} (the run stopped before its first "
                                "checkpoint); start over with --overwrite")
    if explicit is None:
        take = set(config_cls.RESUME_OVERRIDABLE)
    else:
        changeable = set(config_cls.RESUME_OVERRIDABLE) | set(BOOKKEEPING_OPTIONS)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        mine, theirs = config.resolved(), saved.resolved()  # a relative --data names the same folder
        refused = [name for name in sorted(set(explicit) & fields - changeable - set(SESSION_OPTIONS))
                   if getattr(mine, name) != getattr(theirs, name)]
        if refused:
            listing = ", ".join(f"{n} (saved {getattr(saved, n)!r}, given {getattr(config, n)!r})" for n in refused)
            raise ValueError(f"cannot resume {run} with other training options: {listing}; resume without them, "
                             "or start a new run")
        take = (set(explicit) & changeable) | set(SESSION_OPTIONS)
    for name in sorted(take):
        setattr(saved, name, getattr(config, name))
    saved.out = str(run)
    saved.resume = str(run)
    saved.validate()
    saved._resume_resolved = True  # not a field: pretrain() / finetune() must not merge it again
    return saved


def run_training(config: Any, config_cls: type, body: Callable[[Any, D.DistContext], Path]) -> Path:
    """The entry shared by :func:`pretrain` and ``finetune``: resolve ``--resume``, validate,
    start the process group, return ``body(config, ctx)`` and always tear the group down."""
    config = resolve_resume(config, config_cls)
    config.validate()
    ctx = D.init_distributed(config.device)
    # Training crops have one fixed shape, so cuDNN's measured algorithm choice (what benchmarks/ times)
    # pays after the first step; the caller's setting comes back afterwards.
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark or ctx.device.type == "cuda"
    try:
        return body(config, ctx)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        D.cleanup(ctx)


@dataclass
class RunSession:
    """A training run opened by :func:`open_run`. ``metrics`` and ``pbar``, once the loop sets
    them, are closed with the run; ``meta`` is the cache's ``dataset.json``."""

    run: Path
    main: bool
    resuming: bool
    stop: StopSignal
    log: RunLog
    cache: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: MetricsWriter | None = None
    pbar: Any = None

    def progress_bar(self, progress: bool, total: int, initial: int, desc: str, unit: str) -> Any:
        """A tqdm bar on the main rank when ``progress``, else None (kept in ``pbar``)."""
        if self.main and progress:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
        return self.pbar


@contextmanager
def open_run(config: Any, ctx: D.DistContext) -> Iterator[RunSession]:
    """The common start of a run: run folder and ``config.yaml`` (rank 0), log file, signal
    handling, seeding, and the data resolved to a cache whose index is read. On exit (normal or
    not) the signal handlers, progress bar, metrics writer and log are released.

    A new run (not ``config.resume``) refuses a folder that already holds a run unless
    ``config.overwrite``, which moves the earlier run's files into ``RUN/.overwritten-<timestamp>/``
    first. Rank 0 looks; every rank raises the same :class:`RunExistsError` (a ValueError).
    """
    run = Path(config.out)
    main = ctx.is_main
    moved = _claim_run_folder(run, config, main)
    if main:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        config.resolved(ctx.device).save_yaml(run / "config.yaml")
    D.barrier()
    session = RunSession(run, main, bool(config.resume), StopSignal().__enter__(), RunLog(run, enabled=main))
    if moved is not None:
        logger.warning("--overwrite: the earlier run in %s was moved aside to %s", run, moved)
    try:
        seed_everything(config.seed + ctx.rank)
        session.cache = resolve_data(config.data, run, workers=config.workers, progress=config.progress and main,
                                     is_main=main)
        D.barrier()
        session.meta = read_cache_meta(session.cache)
        yield session
    finally:
        session.stop.__exit__(None, None, None)
        if session.pbar is not None:
            session.pbar.close()
        if session.metrics is not None:
            session.metrics.close()
        session.log.close()


def _claim_run_folder(run: Path, config: Any, main: bool) -> Path | None:
    """Rank 0 checks ``run`` for an earlier run (and moves it aside with ``config.overwrite``); the
    verdict goes to every rank so that all raise together. Returns where the earlier run went."""
    problem, moved = None, None
    if main:
        overwrite = bool(getattr(config, "overwrite", False))
        try:
            check_run_folder(run, resume=bool(config.resume), overwrite=overwrite)
            if overwrite and not config.resume:
                moved = move_run_aside(run)
        except RunExistsError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot move the earlier run in {run} aside: {exc}"
    problem = D.broadcast_object(problem)
    if problem:
        raise RunExistsError(problem)
    return moved


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

    def resume_from(self, path: Path, module_key: str) -> tuple[dict[str, Any], list[Any] | None]:
        """Load a checkpoint into this loop (see :meth:`load_state_dict`) and count it as the last
        checkpoint; returns (the checkpoint dict, its per-rank RNG list).

        ``path``: a checkpoint file, or a run folder: its ``checkpoints/last.pt``, or the newest valid
        ``checkpoints/epoch_NNNN.pt`` when last.pt is missing or damaged (see
        :func:`mambamim.engine.checkpoint.load_resume_checkpoint`)."""
        if Path(path).is_dir():
            path, state = load_resume_checkpoint(path, map_location="cpu")
        else:
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


def _fast_forward(
    model: nn.Module, device: torch.device, enabled: bool, memory_budget: float = 1.0, cuda_graphs: bool = False
) -> tuple[Callable, Callable]:
    """(forward, prepare_input): torch.compile and, on CUDA, channels-last 3D when ``enabled``; CUDA
    graphs with ``cuda_graphs`` on one CUDA device (elsewhere a warning, and plain compile).

    ``model`` (possibly DDP-wrapped) must already hold channels-last weights on CUDA; see
    :func:`_channels_last`. Checkpoints keep using the eager module's state.
    """
    if not enabled:
        return model, lambda x: x
    if cuda_graphs and (device.type != "cuda" or isinstance(model, nn.parallel.DistributedDataParallel)):
        logger.warning("CUDA graphs need one CUDA device without DDP; compiling without them")
        cuda_graphs = False
    prepare = (lambda x: x.contiguous(memory_format=torch.channels_last_3d)) if device.type == "cuda" else (lambda x: x)
    return CompiledOrEager(model, memory_budget=memory_budget, cuda_graphs=cuda_graphs), prepare


def _channels_last(model: nn.Module, device: torch.device, enabled: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last_3d) if enabled and device.type == "cuda" else model


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


# --------------------------------------------------------------------------- factories (patchable)


def _prepare_for_training(loop: TrainLoop, model: nn.Module, ctx: D.DistContext, config: Any,
                          probe: Callable[[nn.Module], torch.Tensor]) -> tuple[nn.Module, Callable, Callable]:
    """channels-last, DDP wrap (``loop.model``) and the (compiled) forward. ``probe`` runs the
    model once on a dummy batch to find unused parameters. Returns (model, forward, prepare)."""
    model = _channels_last(model, ctx.device, config.compile)
    loop.model = _wrap_model(model, ctx, config.find_unused_parameters, probe)
    forward, prepare = _fast_forward(loop.model, ctx.device, config.compile, config.memory_budget,
                                     getattr(config, "cuda_graphs", False))
    return model, forward, prepare


def _make_pretrainer(config: PretrainConfig) -> nn.Module:
    from mambamim.pretrain import create_pretrainer

    extra = {} if config.decoder_width is None else {"decoder_width": config.decoder_width}
    return create_pretrainer(
        config.model,
        in_channels=config.in_channels,
        mask_ratio=config.mask_ratio,
        token=config.token,
        skip=config.skip,
        bottom_up=config.bottom_up,
        scan=config.scan,
        sparse_full_res=resolve_sparse_full_res(config),
        sparse_levels=resolve_sparse_levels(config),
        **model_size_kwargs(config.size),
        **extra,
    )


def resolve_sparse_full_res(config: Any) -> bool:
    """``config.sparse_full_res``, with None meaning: on wherever it applies (a CNN stage under bottom-up masking)."""
    if config.sparse_full_res is not None:
        return bool(config.sparse_full_res)
    return config.model != "vim_unetr" and bool(config.bottom_up)


def resolve_sparse_levels(config: Any) -> int:
    """``config.sparse_levels``, with None meaning 2 under CUDA graphs and 1 otherwise: on an H100 the
    half-resolution cells saved time only once kernel launches no longer cost host time."""
    if config.sparse_levels is not None:
        return int(config.sparse_levels)
    return 2 if config.cuda_graphs else 1


def _make_loader(cache: Path, config: Any, ctx: D.DistContext, labeled: bool, augment: bool, case_ids=None):
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
        grid = [s // 16 for s in x.shape[2:]]
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


# ----------------------------------------------------------------------------------------- run


def pretrain(config: PretrainConfig) -> Path:
    """Run (or resume, with ``config.resume``) MambaMIM pre-training; returns the run folder.

    Under ``torchrun`` every process calls this; only rank 0 writes files.

    Raises:
        NonFiniteLossError: the loss became NaN / inf (the last checkpoint stays intact).
        FileNotFoundError / ValueError: bad data path or options.
    """
    return run_training(config, PretrainConfig, _pretrain)


def _pretrain(config: PretrainConfig, ctx: D.DistContext) -> Path:
    with open_run(config, ctx) as session:
        run, main, resuming, cache, meta = session.run, session.main, session.resuming, session.cache, session.meta
        shapes = [c.get("shape") for c in meta.get("cases", []) if c.get("shape")]
        if shapes and int(shapes[0][0]) != config.in_channels:
            logger.info("the cache has %d channel(s): in_channels %d -> %d", shapes[0][0], config.in_channels, shapes[0][0])
            config.in_channels = int(shapes[0][0])
            if main:
                config.resolved(ctx.device).save_yaml(run / "config.yaml")
        loader = _make_loader(cache, config, ctx, labeled=False, augment=True, case_ids=config.cases)
        steps_per_epoch = len(loader)
        total = config.steps if config.steps is not None else config.epochs * steps_per_epoch

        model = _make_pretrainer(config).to(ctx.device)
        loop, warmup = build_train_loop(model, config, ctx, total, session.stop)
        amp = loop.amp
        rng = None
        last_path = run / "checkpoints" / "last.pt"
        if resuming:
            state, rng = loop.resume_from(run, "pretrainer")
            saved_total = state.get("total_steps")
            if saved_total and int(saved_total) != total:
                # e.g. --epochs on another number of processes: the restored schedule keeps the run's length
                logger.warning("this session would count %d steps, the run was planned for %d (another number of "
                               "processes?): keeping the run's %d", total, saved_total, saved_total)
                total = int(saved_total)
            logger.info("resumed %s at step %d (epoch %d, batch %d)", run, loop.step, loop.position.epoch, loop.position.batch)

        crop = config.crop
        probe_x = torch.zeros(1, config.in_channels, crop, crop, crop, device=ctx.device)
        model, forward, prepare = _prepare_for_training(loop, model, ctx, config, lambda m: m(probe_x)["loss"])

        model_info = {
            "name": config.model,
            "kwargs": {"in_channels": config.in_channels, "scan": config.scan, **model_size_kwargs(config.size)},
        }
        if main:
            n_params = sum(p.numel() for p in model.parameters())
            logger.info(
                "pre-training %s (%s, %.2f M parameters) on %s: %d steps (%d per epoch), warm-up %d steps, %s, %s",
                config.model, config.size, n_params / 1e6, cache, total, steps_per_epoch, warmup,
                precision_words(amp), processes_words(ctx.world_size, ctx.device),
            )
        preview = _fixed_volume(cache, config.cases, crop) if main and config.vis_every else None
        metrics = session.metrics = MetricsWriter(run, enabled=main, resume_step=loop.step if resuming else None)

        def checkpoint(periodic: bool = False) -> None:
            state = loop.state_dict("pretrainer")  # collective
            if main:
                state.update({"format": "mambamim-pretrain", "version": 1, "total_steps": total,
                              "model": model_info, "config": config.to_dict(),
                              "preprocessing": meta.get("preprocessing")})
                save_checkpoint(last_path, state)
                if periodic:
                    save_checkpoint(run / "checkpoints" / f"epoch_{loop.position.epoch:04d}.pt", state)
                save_checkpoint(run / "encoder.pt", {
                    "format": "mambamim-encoder", "version": 1,
                    "encoder": D.unwrap(loop.model).encoder.state_dict(),
                    "model": model_info, "config": config.to_dict(), "step": loop.step,
                    "preprocessing": meta.get("preprocessing"),
                })
            loop.last_checkpoint, loop.last_checkpoint_step = last_path, loop.step
            D.barrier()

        end = total if config.stop_after is None else min(total, loop.step + config.stop_after)
        pbar = session.progress_bar(config.progress, total, loop.step, "pretrain", "step")
        window: list[float] = []
        t_last = time.perf_counter()
        loop.model.train()
        batches = loop.batches(loader, rng, ctx.rank, ctx.world_size) if loop.step < end else iter(())
        for batch in batches:
            x = prepare(batch["image"].to(ctx.device, non_blocking=True))
            with loop.autocast():
                out = forward(x)
            loss_value, grad_norm = loop.backward_step(out["loss"])
            window.append(loss_value)
            if pbar is not None:
                pbar.update(1)
            epoch_done = loop.position.batch >= steps_per_epoch
            if loop.step % config.log_every == 0 or loop.step == end or epoch_done:
                now = time.perf_counter()
                sec = (now - t_last) / len(window)
                t_last = now
                row = {"step": loop.step, "epoch": loop.position.epoch, "loss": sum(window) / len(window),
                       "lr": loop.lr, "sec_per_step": sec, "crops_per_s": x.shape[0] * ctx.world_size / max(sec, 1e-9)}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                row.update(window_peak_memory(ctx.device))
                metrics.log(row, prefix="train/", phase="train")
                if pbar is not None:
                    pbar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                window = []
            if epoch_done:
                epoch = loop.position.epoch
                loop.position = DataPosition(epoch + 1, 0)
                periodic = bool(config.save_every) and (epoch + 1) % config.save_every == 0
                checkpoint(periodic=periodic)
                if main:
                    logger.info("epoch %d done at step %d/%d, loss %.4f", epoch, loop.step, total, loss_value)
                if preview is not None and ((epoch + 1) % config.vis_every == 0 or loop.step >= end):
                    _render_preview(loop.model, preview, config.mask_ratio, config.seed,
                                    run / "reconstructions" / f"epoch_{epoch + 1:04d}.png", loop)
            elif config.checkpoint_steps and loop.step % config.checkpoint_steps == 0 and loop.step < end:
                checkpoint()
            if loop.step >= end or loop.stop_requested:
                break
        if loop.last_checkpoint_step != loop.step:
            checkpoint()
        if loop.stop_requested:
            raise TrainingInterrupted(f"stopped by a signal at step {loop.step}/{total}; checkpoint {last_path}; "
                                      f"continue with --resume {run}")
        if preview is not None and not (run / "reconstructions").exists():
            _render_preview(loop.model, preview, config.mask_ratio, config.seed,
                            run / "reconstructions" / f"step_{loop.step:07d}.png", loop)
        if main:
            done = "finished" if loop.step >= total else f"stopped at step {loop.step}/{total} (resume with --resume {run})"
            logger.info("pre-training %s; encoder weights in %s", done, run / "encoder.pt")
        return run
