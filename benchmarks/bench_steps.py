"""Whole-step benchmarks: pre-training step, fine-tuning step, sliding-window inference, TOKI.

Every figure is timed against a baseline in the same run: our own dense-fp32-eager configuration for
steps, the plain float32 path for inference. Prints a markdown table (and writes it to
$OUT/bench_steps.md when OUT is set).

    python benchmarks/bench_steps.py --only pretrain finetune infer toki [--batch 8] [--crop 96]

CPU runs work with tiny settings (``--size tiny --crop 32 --batch 2``) to check the script itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext

from mambamim.runtime.allocator import ALLOC_CONF, apply_allocator_defaults

apply_allocator_defaults()  # the allocator settings the CLI runs with, set before torch starts CUDA
import torch  # noqa: E402

from _report import save_table  # noqa: E402

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int, peak_after_first: bool = False) -> tuple[float, float]:
    """Median seconds per call and peak memory (GiB) over ``iters`` calls after ``warmup``.

    ``peak_after_first`` counts from the second warm-up call on: compiled with CUDA graphs, the first call
    compiles and runs eagerly and the second records the graphs, whose memory pool is allocated then, so the
    peak includes the recording (the pool's high-water mark) but not compile-time autotuning buffers.
    """
    if peak_after_first and warmup < 2:
        raise ValueError("peak_after_first needs at least two warm-up calls")
    for i in range(warmup):
        fn()
        if device.type == "cuda" and i == 0 and peak_after_first:
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    if device.type == "cuda" and not peak_after_first:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


class _Rows(list):
    """Rows that are also printed as they come, so a run cut off by a time limit still reports them."""

    def append(self, row) -> None:
        what, t, peak = row
        print(f"[row] {what}: {t:.4f} s, peak {peak:.2f} GiB", flush=True)
        super().append(row)


def _select(variants: list, args) -> list:
    """The baseline (index 0) always runs; then ``--variants`` indices or, with ``--best-only``, the last."""
    if args.variants:  # in the order given
        return variants[:1] + [variants[i] for i in dict.fromkeys(args.variants) if 0 < i < len(variants)]
    if args.best_only and len(variants) > 1:
        return variants[:1] + variants[-1:]
    return variants


def pretrain_variants(args, device):
    from mambamim.pretrain import create_pretrainer

    rows = _Rows()
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, device=device)
    variants = [("fp32 eager (baseline)", dict(amp=False, cl=False, compile=False))]
    if device.type == "cuda":
        variants += [
            ("bf16 autocast", dict(amp=True, cl=False, compile=False)),
            ("bf16 + channels_last", dict(amp=True, cl=True, compile=False)),
            ("bf16 + torch.compile", dict(amp=True, cl=False, compile=True)),
            ("bf16 + channels_last + torch.compile", dict(amp=True, cl=True, compile=True)),
            # forward + backward replayed as CUDA graphs (no launch overhead); AdamW stays outside
            ("bf16 + channels_last + compile (CUDA graphs)", dict(amp=True, cl=True, compile="reduce-overhead")),
            # the stem, the full-resolution widening layer and skip projection on visible cells only (same result)
            ("bf16 + channels_last + compile + sparse full-res", dict(amp=True, cl=True, compile=True, sparse=True)),
            ("bf16 + channels_last + compile (CUDA graphs) + sparse full-res",
             dict(amp=True, cl=True, compile="reduce-overhead", sparse=True)),
            # recompute elementwise ops in the backward pass instead of keeping their outputs (--memory-budget)
            ("bf16 + channels_last + compile, activation memory budget 0.5",
             dict(amp=True, cl=True, compile=True, budget=0.5)),
            # how many encoder levels run on visible cells (sparse_levels; 1 unless given; the engine takes 2
            # under CUDA graphs: variant 11)
            ("bf16 + channels_last + compile + sparse, 3 levels on cells",
             dict(amp=True, cl=True, compile=True, sparse=True, levels=3)),
            ("bf16 + channels_last + compile + sparse, full resolution only on cells",
             dict(amp=True, cl=True, compile=True, sparse=True, levels=1)),
            ("bf16 + channels_last + compile (CUDA graphs) + sparse, 2 levels on cells",
             dict(amp=True, cl=True, compile="reduce-overhead", sparse=True, levels=2)),
            # variant 11 keeping less for the backward pass (--memory-budget 0.5 in the engine)
            ("bf16 + channels_last + compile (CUDA graphs) + sparse, 2 levels on cells, activation memory budget 0.5",
             dict(amp=True, cl=True, compile="reduce-overhead", sparse=True, levels=2, budget=0.5)),
            # the same at budget 0.4: the engine's both memory targets on an H100 (twelfth session)
            ("bf16 + channels_last + compile (CUDA graphs) + sparse, 2 levels on cells, activation memory budget 0.4",
             dict(amp=True, cl=True, compile="reduce-overhead", sparse=True, levels=2, budget=0.4)),
        ]
    else:  # on a CPU the full-resolution convolutions dominate: the sparse path is the one variant
        variants.append(("fp32 eager + sparse full-res", dict(amp=False, cl=False, compile=False, sparse=True)))
    variants = _select(variants, args)
    for label, v in variants:
        torch._dynamo.reset()  # else a later variant can reuse an earlier one's compiled graph
        torch.manual_seed(0)
        model = create_pretrainer("hymamba", size=args.size, sparse_full_res=v.get("sparse", False),
                                  sparse_levels=v.get("levels", 1)).to(device)
        if v["cl"]:
            model = model.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        mode = v["compile"] if isinstance(v["compile"], str) else None
        fwd = torch.compile(model, mode=mode) if v["compile"] else model
        ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if v["amp"] else nullcontext
        xin = x.contiguous(memory_format=torch.channels_last_3d) if v["cl"] else x

        budget = v.get("budget")
        patch = (lambda: torch._functorch.config.patch(activation_memory_budget=budget)) if budget else nullcontext

        def step():
            with ctx(), patch():
                out = fwd(xin)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            graphs = mode == "reduce-overhead"
            t, peak = timed(step, device, args.warmup + (3 if v["compile"] else 0), args.iters, peak_after_first=graphs)
            rows.append((f"pretrain step, {label}" + (" (peak from the graph recording on)" if graphs else ""), t, peak))
            if device.type == "cuda":  # a CUDA graph's private pool stays reserved: its real footprint
                print(f"[mem] {label}: reserved peak {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB, "
                      f"reserved now {torch.cuda.memory_reserved(device) / 2**30:.2f} GiB", flush=True)
        except Exception as exc:  # report and go on with the other variants
            rows.append((f"pretrain step, {label}: FAILED {type(exc).__name__}: {str(exc)[:80]}", float("nan"), float("nan")))
        del model, opt, fwd
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def finetune_variants(args, device):
    from monai.losses import DiceCELoss

    from mambamim.models import create_model

    rows = _Rows()
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, device=device)
    y = torch.randint(0, 14, (args.batch, 1, args.crop, args.crop, args.crop), device=device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    # (label, bf16, compile, channels-last, MAMBAMIM_DISABLE_TRITON)
    variants = [("fp32 eager (baseline)", False, False, False, "")]
    if device.type == "cuda":
        variants += [
            ("bf16 autocast", True, False, False, ""),
            ("bf16 + torch.compile", True, True, False, ""),
            ("bf16 + channels_last + torch.compile", True, True, True, ""),
            ("bf16 + torch.compile, PyTorch depthwise conv", True, True, False, "dwconv"),
            ("bf16 + channels_last + compile (CUDA graphs)", True, "reduce-overhead", True, ""),
            ("bf16 + channels_last + compile max-autotune (no CUDA graphs)", True, "max-autotune-no-cudagraphs", True, ""),
        ]
    variants = _select(variants, args)
    saved_env = os.environ.get("MAMBAMIM_DISABLE_TRITON", "")
    for label, amp, comp, cl, disable in variants:
        torch._dynamo.reset()  # else a later variant can reuse an earlier one's compiled graph
        os.environ["MAMBAMIM_DISABLE_TRITON"] = disable or saved_env
        torch.manual_seed(0)
        model = create_model("hymamba", size=args.size, num_classes=14).to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        fwd = torch.compile(model, mode=comp if isinstance(comp, str) else None) if comp else model
        xin = x.contiguous(memory_format=torch.channels_last_3d) if cl else x

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = fwd(xin)
            loss_fn(logits.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            graphs = comp == "reduce-overhead"
            t, peak = timed(step, device, args.warmup + (3 if comp else 0), args.iters, peak_after_first=graphs)
            rows.append((f"finetune step ({args.batch} crops), {label}" + (" (peak from the graph recording on)" if graphs else ""), t, peak))
        except Exception as exc:
            rows.append((f"finetune step, {label}: FAILED {type(exc).__name__}: {str(exc)[:80]}", float("nan"), float("nan")))
        del model, opt, fwd
        if device.type == "cuda":
            torch.cuda.empty_cache()
    os.environ["MAMBAMIM_DISABLE_TRITON"] = saved_env
    return rows


def infer_variants(args, device):
    from monai.inferers import sliding_window_inference

    from mambamim.models import create_model

    rows = _Rows()
    shape = tuple(args.volume)
    vol = torch.rand(1, 1, *shape, device=device)
    torch.manual_seed(0)
    model = create_model("hymamba", size=args.size, num_classes=14).to(device).eval()
    roi = (args.crop,) * 3
    # (label, bf16, sw_batch, compile mode or None, channels-last)
    variants = [("fp32 (baseline)", False, 4, None, False)]
    if device.type == "cuda":
        variants += [
            ("bf16, sw_batch 8", True, 8, None, False),
            ("bf16 + torch.compile, sw_batch 8", True, 8, "default", False),
            ("bf16 + channels_last + torch.compile, sw_batch 8", True, 8, "default", True),
            ("bf16 + channels_last + compile (CUDA graphs), sw_batch 8", True, 8, "reduce-overhead", True),
            # what `mambamim predict --compile` runs: predict_volume over a CompiledSegmenter (softmax included)
            ("predict_volume + CompiledSegmenter (the CLI's --compile), sw_batch 8", True, 8, "segmenter", True),
            # Inductor also times its Triton conv3d template against cuDNN per convolution shape (forward only)
            ("bf16 + channels_last + compile max-autotune (no CUDA graphs), sw_batch 8", True, 8,
             "max-autotune-no-cudagraphs", True),
        ]
    variants = _select(variants, args)
    for label, amp, swb, mode, cl in variants:
        torch._dynamo.reset()  # else a later variant can reuse an earlier one's compiled graph
        if mode == "segmenter":
            from mambamim.inference import compile_segmenter, predict_volume

            segmenter = compile_segmenter(model.to(memory_format=torch.contiguous_format))

            def run():
                return predict_volume(segmenter, vol[0], roi=roi, overlap=0.5, sw_batch_size=swb, amp=amp)

            t, peak = timed(run, device, 2, max(2, args.iters // 3))
            rows.append((f"sliding window {shape}, {label}", t, peak))
            continue
        net = model.to(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
        net = torch.compile(net, mode=mode) if mode else net
        comp = mode is not None

        @torch.inference_mode()
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return sliding_window_inference(vol, roi, swb, net, overlap=0.5, mode="gaussian")

        t, peak = timed(run, device, 2 if comp else 1, max(2, args.iters // 3))
        rows.append((f"sliding window {shape}, {label}", t, peak))
    return rows


def toki_rows(args, device):
    from mambamim.masking import random_bottleneck_mask
    from mambamim.ops.toki import toki_fill

    b, grid, c = 8, (6, 6, 6), 384
    tokens = torch.randn(b, 216, c, device=device)
    vis = random_bottleneck_mask(b, grid, 0.75, device=device).flatten(1)
    A = torch.randn(c, c, device=device) * 0.01
    edge = torch.randn(c, device=device)
    t, _ = timed(lambda: toki_fill(tokens, vis, A, edge), device, 5, 50)
    rows = [("TOKI fill, batch 8, 6^3 grid, 384 ch (forward)", t, float("nan"))]
    tokens.requires_grad_(True)
    A.requires_grad_(True)

    def fb():
        toki_fill(tokens, vis, A, edge).sum().backward()

    t, _ = timed(fb, device, 5, 50)
    rows.append(("TOKI fill, forward + backward", t, float("nan")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", default=["pretrain", "finetune", "infer", "toki"])
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--volume", type=int, nargs=3, default=[256, 256, 160])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--variants", type=int, nargs="*", default=None, help="variant indices of each benchmark (0, the baseline, always runs)")
    parser.add_argument("--best-only", action="store_true", help="only the baseline and the fastest variant of each")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = _Rows()
    table = {"pretrain": pretrain_variants, "finetune": finetune_variants, "infer": infer_variants, "toki": toki_rows}
    for key in args.only:
        rows += table[key](args, device)
        print(f"[{key} done]", flush=True)
    lines = [
        f"device: {name}; torch {torch.__version__}; batch {args.batch}; crop {args.crop}; size {args.size}; "
        f"{ALLOC_CONF}={os.environ.get(ALLOC_CONF)!r}",
        "",
        "| what | median time | peak GiB |",
        "| --- | --- | --- |",
    ]
    for what, t, peak in rows:
        ts = f"{t * 1e3:.2f} ms" if t < 0.1 else f"{t:.3f} s"
        lines.append(f"| {what} | {ts} | {peak:.2f} |")
    text = "\n".join(lines)
    print(text)
    save_table(text, "bench_steps.md")


if __name__ == "__main__":
    main()
