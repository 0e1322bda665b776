"""Single-process and ``torchrun`` (DDP) execution with one code path.

Under ``torchrun`` the environment holds RANK, WORLD_SIZE and LOCAL_RANK; :func:`init_distributed`
then starts a process group (NCCL on GPU, gloo on CPU). Without it everything degrades to one
process: :func:`is_main` is True, :func:`barrier` does nothing, :func:`all_reduce_mean` returns its
input.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mambamim.runtime.device import autocast_context, resolve_amp, resolve_device  # noqa: F401  (D.<name>)

logger = logging.getLogger(__name__)

__all__ = [
    "DistContext",
    "resolve_device",
    "init_distributed",
    "cleanup",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "all_reduce_mean",
    "all_gather_objects",
    "broadcast_object",
    "wrap_ddp",
    "unwrap",
    "has_unused_parameters",
    "autocast_context",
    "resolve_amp",
]


@dataclass
class DistContext:
    """The process's place in a (possibly one-process) job.

    Attributes:
        rank, world_size, local_rank: as torchrun sets them (0, 1, 0 without torchrun).
        device: the device this process computes on.
        backend: "nccl", "gloo" or None (no process group).
        owns_group: True when :func:`init_distributed` created the process group (and
            :func:`cleanup` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str | torch.device = "auto", timeout_minutes: float = 60.0) -> DistContext:
    """Join the ``torchrun`` job described by the environment, or run as one process.

    If a process group already exists (e.g. created by the caller), it is reused and not owned.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local_rank, dev, dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world <= 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(0, 1, 0, dev, None, owns_group=False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "timeout": timedelta(minutes=timeout_minutes)}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # older torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    logger.info("joined process group: rank %d/%d (local %d) on %s via %s", rank, world, local_rank, dev, backend)
    return DistContext(rank, world, local_rank, dev, backend, owns_group=True)


def cleanup(ctx: DistContext | None = None) -> None:
    """Destroy the process group if ``ctx`` created it (or, with no ctx, if one exists)."""
    if dist.is_available() and dist.is_initialized() and (ctx is None or ctx.owns_group):
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 and in one-process runs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks of a tensor or a number (returned as the same kind; the input tensor is
    not modified)."""
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        if dist.get_backend() == "nccl" and out.device.type != "cuda":
            out = out.cuda()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / dist.get_world_size()).to(value.device)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def has_unused_parameters(model: nn.Module, probe: Callable[[nn.Module], torch.Tensor]) -> list[str]:
    """Names of trainable parameters that get no gradient from ``probe(model)`` (a loss).

    Runs under ``torch.random.fork_rng`` so that the probe does not shift the random streams;
    gradients are cleared and buffers restored afterwards.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    with torch.random.fork_rng(devices=devices):
        model.zero_grad(set_to_none=True)
        probe(model).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        model.zero_grad(set_to_none=True)
    with torch.no_grad():  # e.g. BatchNorm running statistics must not see the probe
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
    return unused


def wrap_ddp(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap in ``DistributedDataParallel`` when the job has several processes; otherwise return
    ``model`` unchanged."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


