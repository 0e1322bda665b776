"""``mambamim info``: build a network, run forward and backward on a synthetic volume, print size and time."""

from __future__ import annotations

import argparse
import time

import torch

from mambamim.models import MODEL_PRESETS, create_model, list_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="hymamba", choices=list_models())
    parser.add_argument("--size", default="base", help="preset: base (paper), small, tiny")
    parser.add_argument("--crop", type=int, nargs="+", default=[96], help="input side(s), multiples of 16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--scan", default="raster", choices=["raster", "zigzag", "hilbert", "shuffle"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def fast_paths(device: torch.device) -> str:
    """Which fused kernels this device gets (and why not, where it gets none)."""
    from mambamim.ops.conv3d import triton_disabled

    if device.type != "cuda":
        return "none on CPU (PyTorch reference paths)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "none: triton is not installed (pip install triton, or the [gpu] extra)"
    parts = [f"{label} {'off (MAMBAMIM_DISABLE_TRITON)' if triton_disabled(name) else 'Triton'}"
             for name, label in (("scan", "selective scan"), ("dwconv", "depthwise conv"))]  # fmt: skip
    return ", ".join(parts + ["stem im2col GEMM"])


def run(args: argparse.Namespace) -> int:
    if args.size not in MODEL_PRESETS[args.model]:
        print(f"unknown size {args.size!r} for {args.model}; available: {sorted(MODEL_PRESETS[args.model])}")
        return 2
    crop = tuple(args.crop) * 3 if len(args.crop) == 1 else tuple(args.crop)
    if len(crop) != 3 or any(c % 16 for c in crop):
        print(f"--crop needs 1 or 3 sides, each a multiple of 16; got {args.crop}")
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    torch.manual_seed(0)
    model = create_model(
        args.model, size=args.size, in_channels=args.in_channels, num_classes=args.num_classes, scan=args.scan
    ).to(device)
    n_total = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    print(f"model      {args.model} ({args.size}), scan {args.scan}")
    print(f"device     {device}; fast paths: {fast_paths(device)}")
    print(f"parameters {n_total / 1e6:.2f} M (encoder {n_enc / 1e6:.2f} M, pre-trainable)")
    x = torch.rand(args.batch_size, args.in_channels, *crop, device=device)
    amp = device.type == "cuda"
    for label in ("first step (warm-up)", "second step"):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = model(x)
        y.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{label:22s} forward+backward on {tuple(x.shape)} -> {tuple(y.shape)}: {time.perf_counter() - t0:.2f} s")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {torch.cuda.get_device_name(device)}")
    return 0
