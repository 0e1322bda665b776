"""``mambamim info``: build a network, print its parameter counts per module group and time
forward + backward on a small synthetic crop (seconds on a CPU); ``--benchmark`` times the
training crop (96^3 by default) over several steps, reporting progress as it goes.

Nothing heavy is imported at module level (torch, the models): ``mambamim info --help`` must
answer at once. They are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mambamim.models.registry import PATCH_SIZE, get_entry, list_models, list_sizes

# From the model registry, which imports no torch (building the parser stays instant).
MODELS = tuple(list_models())
SIZES = tuple(list_sizes())
QUICK_CROP = 32  # the smallest side HyMamba's bottleneck norm accepts at batch size 1
BENCHMARK_CROP = 96  # the paper's training crop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="hymamba", choices=MODELS, help="network (default hymamba)")
    parser.add_argument("--size", default="base", choices=SIZES,
                        help="preset: base = the paper's configuration (default), small, tiny, "
                             "authors = the authors' released HyMamba (hymamba only)")
    parser.add_argument("--crop", type=int, nargs="+", default=None, metavar="N",
                        help=f"input side(s), one value or D H W, multiples of {PATCH_SIZE} (default {QUICK_CROP}, "
                             f"with --benchmark {BENCHMARK_CROP})")
    parser.add_argument("--batch-size", type=int, default=1, help="volumes per forward pass (default 1)")
    parser.add_argument("--in-channels", type=int, default=1, help="input channels (default 1)")
    parser.add_argument("--num-classes", type=int, default=14, help="output classes (default 14, BTCV)")
    parser.add_argument("--scan", default="raster", choices=["raster", "zigzag", "hilbert", "shuffle"],
                        help="Mamba scan order (default raster)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto: cuda if available)")
    parser.add_argument("--no-timing", action="store_true",
                        help="only build the network and print its parameter counts (no forward / backward)")
    parser.add_argument("--benchmark", action="store_true",
                        help=f"time forward + backward on the training crop ({BENCHMARK_CROP}^3 unless --crop) over "
                             "--steps steps with progress; the paper's base model takes minutes per step on a CPU")
    parser.add_argument("--steps", type=int, default=3,
                        help="with --benchmark: steps to run, the first one a warm-up (default 3)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="with --benchmark: no per-phase progress lines on stderr")


def fast_paths(device: Any) -> str:
    """Which fused kernels this device (a ``torch.device``) gets (and why not, where it gets none)."""
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


def parameter_groups(model: Any) -> list[tuple[str, int]]:
    """(name, parameter count) per module group: each top-level child, the encoder split into its
    children; parameters held directly by a module show as ``<name>.(own)``; groups without
    parameters (pooling) are left out."""
    groups: list[tuple[str, int]] = []

    def count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    def add(prefix: str, module: Any, expand: bool) -> None:
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own:
            groups.append((f"{prefix}(own)" if prefix else "(own)", own))
        for name, child in module.named_children():
            if expand and name == "encoder" and any(True for _ in child.named_children()):
                add(f"{prefix}{name}.", child, expand=False)
            elif count(child):
                groups.append((f"{prefix}{name}", count(child)))

    add("", model, expand=True)
    return groups


def _crop(args: argparse.Namespace) -> tuple[int, int, int] | None:
    sides = args.crop if args.crop is not None else [BENCHMARK_CROP if args.benchmark else QUICK_CROP]
    crop = tuple(sides) * 3 if len(sides) == 1 else tuple(sides)
    if len(crop) != 3 or any(c < PATCH_SIZE or c % PATCH_SIZE for c in crop):
        return None
    return crop  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    import torch

    from mambamim.models import create_model

    entry = get_entry(args.model)
    if args.size not in entry.presets:
        print(f"unknown size {args.size!r} for {args.model}; available: {sorted(entry.presets)}", file=sys.stderr)
        return 2
    crop = _crop(args)
    if crop is None:
        print(f"--crop needs 1 or 3 sides, each a positive multiple of {PATCH_SIZE}; got {args.crop}", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"--steps must be >= 1; got {args.steps}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = create_model(
        args.model, size=args.size, in_channels=args.in_channels, num_classes=args.num_classes, scan=args.scan
    ).to(device)
    built = time.perf_counter() - t0
    n_total = sum(p.numel() for p in model.parameters())
    encoder = getattr(model, "encoder", None)
    n_enc = sum(p.numel() for p in encoder.parameters()) if encoder is not None else 0
    print(f"model      {args.model} ({args.size}), scan {args.scan}; built in {built:.2f} s: {entry.description}")
    print(f"device     {device}; fast paths: {fast_paths(device)}")
    trainable = "pre-trainable" if entry.pretrainable else "not pre-trainable"
    print(f"parameters {n_total / 1e6:.2f} M (encoder {n_enc / 1e6:.2f} M, {trainable})")
    print(f"geometry   sides multiples of {entry.patch_size} (the patch size), training crop {entry.default_crop}^3")
    groups = parameter_groups(model)
    width = max(len(name) for name, _ in groups)
    for name, n in groups:
        print(f"  {name:{width}s} {n / 1e6:8.3f} M  {100 * n / max(n_total, 1):5.1f} %  ({n:,})")
    if args.no_timing:
        return 0
    x = torch.rand(args.batch_size, args.in_channels, *crop, device=device)
    amp = device.type == "cuda"
    steps = args.steps if args.benchmark else 2
    show = args.benchmark and args.progress
    times = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(steps):
        label = "first step (warm-up)" if i == 0 else ("second step" if i == 1 else f"step {i + 1}")
        if show:
            print(f"[{i + 1}/{steps}] forward on {tuple(x.shape)} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = model(x)
        sync()
        t_fwd = time.perf_counter() - t0
        if show:
            print(f"[{i + 1}/{steps}] forward {t_fwd:.2f} s; backward ...", file=sys.stderr, flush=True)
        y.float().square().mean().backward()
        sync()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        times.append(dt)
        print(f"{label:22s} forward+backward on {tuple(x.shape)} -> {tuple(y.shape)}: {dt:.2f} s "
              f"(forward {t_fwd:.2f} s)", flush=True)
    if len(times) > 2:
        rest = times[1:]
        print(f"mean of steps 2-{len(times)}: {sum(rest) / len(rest):.2f} s per forward+backward")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {torch.cuda.get_device_name(device)}")
    if not args.benchmark:
        print(f"(a quick {crop[0]}x{crop[1]}x{crop[2]} crop; `mambamim info --benchmark` times the "
              f"{BENCHMARK_CROP}^3 training crop)")
    return 0
