"""Where the pre-training step's time goes, module by module (HyMamba, batch 8, 96^3, mask 0.75).

Runs one real forward to capture every module's inputs, then times each part alone (forward +
backward, bf16 autocast, channels-last 3D, eager) with CUDA events. Two tables: the step's parts
(encoder stages, Mamba stage, TOKI, decoder levels, loss) and every convolution alone with its
achieved TFLOP/s, which is the floor a dense step cannot go under with cuDNN. The whole step
(eager and compiled) is timed in the same run for comparison.

    python benchmarks/profile_modules.py [--batch 8] [--no-compile]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from torch import nn

from _report import save_table

from mambamim.pretrain import create_pretrainer
from mambamim.pretrain.loss import masked_patch_mse


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "tokens"):
        return out.tokens
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(type(out))


def _prep(v, grad: bool):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        # Masks are float 0/1 with one channel: keep them constant.
        is_mask = v.dim() == 5 and v.shape[1] == 1 and grad
        t = v.detach().clone()
        return t.requires_grad_(grad and not is_mask)
    return v


def time_module(fn, args, kwargs, params, iters: int, amp: bool, backward: bool = True) -> tuple[float, float]:
    """(forward ms, forward+backward ms) medians with CUDA events."""
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext

    def run(bwd: bool):
        with ctx():
            out = _first_tensor(fn(*args, **kwargs))
        if bwd:
            out.backward(torch.ones_like(out))
        for p in params:
            p.grad = None
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None

    res = [median_ms(lambda bwd=bwd: run(bwd), iters) for bwd in ((False, True) if backward else (False,))]
    return res[0], (res[1] if backward else float("nan"))


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(iters):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def conv_flops(mod: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward FLOPs (2 per multiply-add)."""
    k = 1
    for s in mod.kernel_size:
        k *= s
    if isinstance(mod, nn.ConvTranspose3d):
        return 2.0 * x.numel() * mod.out_channels * k / mod.groups
    return 2.0 * y.numel() * (mod.in_channels // mod.groups) * k


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--size", default="base", help="tiny + --crop 32 + --device cpu checks the script")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    amp_ok = device.type == "cuda"
    torch.manual_seed(0)
    model = create_pretrainer("hymamba", size=args.size).to(device).to(memory_format=torch.channels_last_3d)
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, device=device)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    mask = model.random_mask(x)

    groups: dict[str, nn.Module] = {}
    enc, dec = model.encoder, model.decoder
    groups["enc stem (1->32 @1)"] = enc.stem
    for i, w in enumerate(enc.widen):
        groups[f"enc widen[{i}]"] = w
    for lvl, stage in enumerate(enc.stages):
        for j, blk in enumerate(stage):
            groups[f"enc MedNeXt L{lvl + 1}.{j}"] = blk
    groups["enc Mamba stage (4 layers)"] = enc.mamba
    groups["TOKI fill"] = model.fill
    groups["dec proj_bottleneck"] = dec.proj_bottleneck
    for i in range(len(dec.ups)):
        groups[f"dec up[{i}]"] = dec.ups[i]
        groups[f"dec proj_skip[{i}]"] = dec.proj_skips[i]
        groups[f"dec fuse[{i}]"] = dec.fuse[i]
    groups["dec head"] = dec.head
    convs = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))}

    captured: dict[str, tuple] = {}
    hooks = []
    for name, mod in list(groups.items()) + [("conv:" + n, m) for n, m in convs.items()]:
        def hook(m, a, kw, out, name=name):
            if name not in captured:
                captured[name] = (a, kw, out)
        hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_ok):
        out = model(x, mask)
    for h in hooks:
        h.remove()
    rec = out["reconstruction"].detach()

    rows = []
    total_f = total_fb = 0.0
    for name, mod in groups.items():
        a, kw, _ = captured[name]
        first = name.startswith("enc stem")
        a = tuple(_prep(v, not first) for v in a)
        kw = {k: _prep(v, True) for k, v in kw.items()}
        f, fb = time_module(mod, a, kw, list(mod.parameters()), args.iters, amp=amp_ok)
        total_f += f
        total_fb += fb
        shape = next((tuple(v.shape) for v in a if isinstance(v, torch.Tensor)), ())
        rows.append(f"| {name} | {shape} | {f:.2f} | {fb:.2f} |")
    r = rec.clone().requires_grad_(True)
    f, fb = time_module(lambda t: masked_patch_mse(t, x, mask, 16), (r,), {}, [], args.iters, amp=False)
    total_f += f
    total_fb += fb
    rows.append(f"| loss | {tuple(r.shape)} | {f:.2f} | {fb:.2f} |")

    crow = []
    conv_total = 0.0
    conv_flop_total = 0.0
    for name, mod in convs.items():
        a, kw, y = captured["conv:" + name]
        first = name == "encoder.stem"
        xin = _prep(a[0], not first)
        fwd = lambda t, m=mod: (nn.ConvTranspose3d.forward(m, t) if isinstance(m, nn.ConvTranspose3d) else nn.Conv3d.forward(m, t))
        f, fb = time_module(fwd, (xin,), {}, list(mod.parameters()), args.iters, amp=amp_ok)
        fl = conv_flops(mod, a[0], y) * (2 if first else 3)
        conv_total += fb
        conv_flop_total += fl
        crow.append((fb, f"| {name} | {tuple(a[0].shape[1:])} -> {tuple(y.shape[1:])} | {f:.2f} | {fb:.2f} | {fl / fb / 1e9:.1f} |"))
    crow.sort(key=lambda t: -t[0])

    # Whole steps in the same run.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    whole = []
    for label, fwd in [("eager", model)] + ([] if args.no_compile else [("compiled", torch.compile(model))]):
        def step(fwd=fwd):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_ok):
                o = fwd(x, mask)
            o["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        f = median_ms(step, args.iters, warmup=3 if label == "eager" else 6)
        whole.append(f"| whole step, bf16 + channels-last, {label} | {f:.1f} ms |")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"device: {name}; torch {torch.__version__}; batch {args.batch}; crop {args.crop}", "",
             "| part (eager, bf16, channels-last) | input | forward ms | forward+backward ms |",
             "| --- | --- | ---: | ---: |", *rows,
             f"| **sum of parts** | | {total_f:.1f} | {total_fb:.1f} |", "",
             "| convolution alone | in -> out (C, D, H, W) | forward ms | fwd+bwd ms | TFLOP/s |",
             "| --- | --- | ---: | ---: | ---: |", *[c for _, c in crow],
             f"| **all convolutions** | | | {conv_total:.1f} | {conv_flop_total / conv_total / 1e9:.1f} |", "",
             "| whole step (+ AdamW) | median |", "| --- | --- |", *whole]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    save_table(text, "profile_modules.md")


if __name__ == "__main__":
    main()
