"""Learning-rate schedule (linear warm-up then cosine, per optimiser step) and the resumable
data position (epoch + batch within epoch)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from mambamim.engine.checkpoint import numpy_state_from_dict, numpy_state_to_dict

__all__ = ["WarmupCosine", "warmup_cosine_scheduler", "default_warmup_steps", "DataPosition", "open_epoch", "capture_loader_rng", "restore_loader_rng"]


class WarmupCosine:
    """Multiplicative LR factor for ``LambdaLR``: linear warm-up, then cosine decay.

    factor(s) = (s + 1) / warmup_steps for s < warmup_steps, then
    min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * p)) with p = (s - warmup) / (total - warmup)
    clipped to [0, 1]. A callable object (not a lambda) so ``LambdaLR.state_dict`` saves it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> LambdaLR:
    """A ``LambdaLR`` stepping once per optimiser step with :class:`WarmupCosine`."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))


def default_warmup_steps(total_steps: int, fraction: float = 0.05, cap: int = 10_000) -> int:
    """Warm-up length used when none is given: 5 % of the run (at most ``cap``), at least 1 step
    when the run is longer than one step."""
    if total_steps <= 1:
        return 0
    return max(1, min(cap, int(round(total_steps * fraction))))


@dataclass
class DataPosition:
    """Where training stands in the data: ``epoch`` (0-based) and batches consumed in it."""

    epoch: int = 0
    batch: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "DataPosition":
        if not state:
            return cls()
        return cls(int(state["epoch"]), int(state["batch"]))


def _set_epoch(loader: Any, epoch: int) -> None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None), getattr(loader, "dataset", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    if inner is not None and hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def open_epoch(loader: Any, epoch: int, skip: int = 0) -> Iterator[Any]:
    """An iterator over epoch ``epoch`` of ``loader`` (``set_epoch(epoch)`` is called on its
    sampler(s) and dataset first) with the first ``skip`` batches already consumed.

    A sampler with ``skip_next`` (:class:`mambamim.data.loaders.EpochSampler`, whose items do not
    depend on what was loaded before) leaves the consumed items out without loading them. With any
    other loader the skipped batches are loaded and dropped, so that every random draw the loader
    makes (crop positions, augmentation) happens exactly as in an uninterrupted run.
    """
    _set_epoch(loader, epoch)
    sampler = getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None)
    if skip and hasattr(sampler, "skip_next") and batch_size:
        sampler.skip_next(skip * batch_size)  # the skipped batches are full: only an epoch's last may be short
        skip = 0
    iterator = iter(loader)
    for _ in range(skip):
        try:
            next(iterator)
        except StopIteration:
            break
    return iterator


def _random_states(loader: Any) -> list[np.random.RandomState]:
    """The NumPy RandomStates of the loader's dataset and transforms (MONAI ``Randomizable.R``),
    in a fixed traversal order."""
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if obj is None or depth > 8 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, np.ndarray)):
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, depth + 1)
            return
        r = getattr(obj, "R", None)
        if isinstance(r, np.random.RandomState) and id(r) not in seen:
            seen.add(id(r))
            found.append(r)
        for attr in ("dataset", "transform", "transforms"):
            child = getattr(obj, attr, None)
            if child is not None and not inspect.ismethod(child) and not inspect.isfunction(child):
                walk(child, depth + 1)

    walk(getattr(loader, "dataset", None), 0)
    return found


def capture_loader_rng(loader: Any) -> dict[str, Any]:
    """Random state a loader keeps outside the global generators: its ``generator`` (worker seeds,
    MONAI's seeding) and the RandomStates of its transforms (crop positions and augmentation when
    ``num_workers=0``)."""
    gen = getattr(loader, "generator", None)
    return {
        "generator": gen.get_state() if isinstance(gen, torch.Generator) else None,
        "transforms": [numpy_state_to_dict(r.get_state()) for r in _random_states(loader)],
    }


def restore_loader_rng(loader: Any, state: dict[str, Any] | None) -> None:
    """Inverse of :func:`capture_loader_rng` (skips parts that do not match this loader)."""
    if not state:
        return
    gen = getattr(loader, "generator", None)
    if state.get("generator") is not None and isinstance(gen, torch.Generator):
        gen.set_state(state["generator"].cpu())
    randoms = _random_states(loader)
    saved = state.get("transforms") or []
    if len(saved) == len(randoms):
        for r, st in zip(randoms, saved):
            r.set_state(numpy_state_from_dict(st))
