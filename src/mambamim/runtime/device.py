"""Device and precision resolution shared by training, inference and the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ContextManager

import torch

__all__ = ["resolve_device", "run_device", "resolve_amp", "autocast_context", "cudnn_benchmark"]


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """Turn "auto" (or None) / "cpu" / "cuda" / "cuda:N" into a device; "cuda" under torchrun means
    ``cuda:LOCAL_RANK``. The one device resolution of training, inference and the CLI.

    Raises:
        ValueError: unknown device string, or CUDA asked for but not available.
    """
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
        if name == "cuda":
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        return torch.device(name)
    raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def run_device(module: torch.nn.Module, device: str | torch.device | None = None) -> torch.device:
    """Where to run ``module``: ``device`` resolved, or, when None, the device its parameters are on (CPU
    for a module without parameters)."""
    if device is not None:
        return resolve_device(device)
    param = next(module.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def resolve_amp(device: torch.device, amp: str = "auto") -> str:
    """The effective precision mode ("bf16", "fp16" or "none") for ``amp`` on ``device``."""
    amp = str(amp).lower()
    if amp not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {amp!r}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device (use --amp none or bf16 on CPU)")
    return amp


def autocast_context(device: torch.device, amp: str = "auto") -> ContextManager[Any]:
    """Mixed-precision context: "auto" = bf16 on CUDA, fp32 elsewhere; "bf16", "fp16", "none".

    Raises:
        ValueError: unknown mode, or half precision asked for on CPU with "fp16".
    """
    mode = resolve_amp(device, amp)
    if mode == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """Let cuDNN time its algorithms for each new convolution shape while on a CUDA ``device``, and put the
    caller's setting back afterwards. Training crops and sliding windows repeat one shape, so the timing at
    the first call pays for itself (the choice benchmarks/ measure); off CUDA it changes nothing."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or torch.device(device).type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
