"""Benchmark the fused Triton selective scan against a PyTorch reference.

Sizes: batch 8, dim 768, d_state 16, lengths 216, 1728, 8192 (HyMamba mixer at 96^3: dim 768;
L 54 visible tokens in pre-training, 216 in fine-tuning). Forward and forward+backward, median
times (triton.testing.do_bench), achieved bandwidth counting each input read once and each output
written once, against a measured device-to-device copy. Prints a markdown table; also writes it to
$OUT/bench_selective_scan.md when OUT is set.

    PYTHONPATH=src python3 benchmarks/bench_selective_scan.py [--sweep] [--quick] [--split] [--lengths 1728 8192]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from _report import save_table

from mambamim.ops import selective_scan_triton as sst

try:
    from mambamim.ops.selective_scan import selective_scan_ref as _lead_ref  # type: ignore
except Exception:  # the lead's module may not exist yet
    _lead_ref = None


def chunked_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=16):
    """Plain-PyTorch selective scan: Hillis-Steele scan inside chunks of ``chunk`` steps, fp32.

    u, delta, z: (b, d, L); A: (d, n); B, C: (b, n, L). Returns y (b, d, L) in u's dtype.
    """
    out_dtype = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    A = A.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t0 in range(0, L, chunk):
        dt = delta[:, :, t0:t0 + chunk]  # (b, d, K)
        k = dt.shape[-1]
        a = torch.exp(dt[..., None] * A[:, None, :])  # (b, d, K, n)
        x = (dt * u[:, :, t0:t0 + chunk])[..., None] * B[:, None, :, t0:t0 + chunk].transpose(-1, -2)
        s = 1
        while s < k:
            x = torch.cat([x[:, :, :s], a[:, :, s:] * x[:, :, :-s] + x[:, :, s:]], dim=2)
            a = torch.cat([a[:, :, :s], a[:, :, s:] * a[:, :, :-s]], dim=2)
            s *= 2
        hs = x + a * h[:, :, None, :]
        ys.append((hs * C[:, None, :, t0:t0 + chunk].transpose(-1, -2)).sum(-1))
        h = hs[:, :, -1]
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def make(b, d, L, n, dtype, device="cuda", grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, device=device, generator=g)

    u = rn(b, d, L).to(dtype)
    delta = (rn(b, d, L) * 0.5 - 1.0).to(dtype)
    A = -(torch.rand(d, n, device=device, generator=g) * 3 + 0.2)
    Bm, Cm = rn(b, n, L).to(dtype), rn(b, n, L).to(dtype)
    D, z, bias = rn(d), rn(b, d, L).to(dtype), rn(d) * 0.3
    args = [u, delta, A, Bm, Cm, D, z, bias]
    if grad:
        args = [a.requires_grad_() for a in args]
    return args


def io_bytes(b, d, L, n, es, backward):
    """Fewest bytes: inputs read once, outputs written once (A, D, bias, their grads ignored)."""
    big, small = b * d * L * es, b * n * L * es
    fwd = 4 * big + 2 * small  # u, delta, z, y; B, C
    if not backward:
        return fwd
    bwd = 4 * big + 2 * small + 3 * big + 2 * small  # read u, delta, z, dy, B, C; write du, ddelta, dz, dB, dC
    return fwd + bwd


def bench(fn: Callable[[], object], grad_to_none=None, rep=200) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def gpu_busy_ms(fn: Callable[[], object], iters: int = 5) -> Optional[float]:
    """Sum of device kernel time per call (torch.profiler): what the GPU spends, without the
    host-side launch gaps that dominate at small L. None when the profiler gives nothing."""
    try:
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        total_us = 0.0
        for e in prof.key_averages():
            total_us += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return total_us / iters / 1e3 if total_us > 0 else None
    except Exception as e:  # profiler unavailable
        print(f"profiler failed: {type(e).__name__}: {e}", flush=True)
        return None


def copy_bandwidth() -> float:
    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e12


def main_table(lengths: List[int], dtypes, with_ref: bool, bw_card: float) -> List[str]:
    b, d, n = 8, 768, 16
    ref = _lead_ref if _lead_ref is not None else chunked_ref
    ref_name = "selective_scan_ref (lead)" if _lead_ref is not None else "chunked_ref (bench, fp32, chunk 16)"
    rows = [f"Reference: {ref_name}. Copy bandwidth measured: {bw_card:.2f} TB/s.", "",
            "triton ms: do_bench median (wall, includes host launch gaps); GPU ms: summed kernel time "
            "from torch.profiler; TB/s and % use triton ms.", "",
            "| L | dtype | pass | triton ms | GPU ms | ref ms | speed-up | GB moved | TB/s | % of copy BW |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for L in lengths:
        for dtype in dtypes:
            es = torch.tensor([], dtype=dtype).element_size()
            args = make(b, d, L, n, dtype)
            ours = lambda: sst.selective_scan_triton(*args, delta_softplus=True)  # noqa: E731
            t_f = bench(ours)
            t_rf = None
            if with_ref:
                t_rf = bench(lambda: ref(*args, delta_softplus=True), rep=100 if L < 8192 else 20)
            gargs = make(b, d, L, n, dtype, grad=True)
            dy = torch.randn(b, d, L, device="cuda", dtype=dtype)

            def fb(op=sst.selective_scan_triton):
                op(*gargs, delta_softplus=True).backward(dy)

            t_fb = bench(fb, grad_to_none=gargs)

            def fb_fresh():
                for x in gargs:
                    x.grad = None
                fb()

            g_f, g_fb = gpu_busy_ms(ours), gpu_busy_ms(fb_fresh)
            t_rfb = None
            # the reference's autograd graph at L=8192 holds tens of GB: forward only there
            if with_ref and L <= 1728:
                t_rfb = bench(lambda: fb(ref), grad_to_none=gargs, rep=100)
            for name, t, tr, bwd, gt in (("fwd", t_f, t_rf, False, g_f), ("fwd+bwd", t_fb, t_rfb, True, g_fb)):
                gb = io_bytes(b, d, L, n, es, bwd) / 1e9
                tbs = gb / (t * 1e-3) / 1e3
                rows.append(
                    f"| {L} | {str(dtype).replace('torch.', '')} | {name} | {t:.4f} | "
                    f"{'-' if gt is None else f'{gt:.4f}'} | "
                    f"{'-' if tr is None else f'{tr:.3f}'} | {'-' if tr is None else f'{tr / t:.1f}x'} | "
                    f"{gb:.3f} | {tbs:.2f} | {100 * tbs / bw_card:.0f}% |")
            print(rows[-2] + "\n" + rows[-1], flush=True)
            del args, gargs, dy
            torch.cuda.empty_cache()
    return rows


FWD_SWEEP = [sst.ScanConfig(4, 16, 1), sst.ScanConfig(4, 8, 1), sst.ScanConfig(4, 16, 2)]
# (2, 8, 1, 2): two channels a thread halve the shuffles of the dB / dC sums; 41.0 instructions an element in
# the chunk loop against 42.9 at (4, 8, 1), same program count (bf16, offline sm_90 build, sixteenth session)
BWD_SWEEP = [sst.ScanConfig(4, 8, 1), sst.ScanConfig(4, 4, 1, 2), sst.ScanConfig(4, 8, 2),
             sst.ScanConfig(4, 4, 1), sst.ScanConfig(4, 8, 1, 2), sst.ScanConfig(2, 8, 1, 2)]


def sweep(lengths: List[int]) -> List[str]:
    b, d, n = 8, 768, 16
    rows = ["| pass | L | ng | block_t | warps | bdt | ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for L in lengths:
        u, delta, A, Bm, Cm, D, z, bias = make(b, d, L, n, torch.bfloat16)
        best = {}
        for cfg in FWD_SWEEP:
            try:
                t = bench(lambda: sst._launch_forward(u, delta, A, Bm, Cm, D, z, bias, True, False, config=cfg), rep=100)
            except Exception as e:  # a config may not compile (resources)
                print(f"fwd {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(f"| fwd | {L} | {cfg.ng} | {cfg.block_t} | {cfg.num_warps} | {cfg.bdt} | {t:.4f} |")
            print(rows[-1], flush=True)
            best.setdefault("fwd", (t, cfg))
            best["fwd"] = min(best["fwd"], (t, cfg), key=lambda p: p[0])
        dy = torch.randn_like(u)
        for cfg in BWD_SWEEP:
            try:
                fw = lambda: sst._launch_forward(u, delta, A, Bm, Cm, D, z, bias, True, True,  # noqa: E731
                                                 save_t=cfg.block_t)
                _, states = fw()
                ts = bench(fw, rep=100)
                t = bench(lambda: sst._launch_backward(dy, u, delta, A, Bm, Cm, D, z, bias, True, states, config=cfg), rep=100)
            except Exception as e:
                print(f"bwd {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(f"| fwd(states) | {L} | {cfg.ng} | {cfg.block_t} | {cfg.num_warps} | {cfg.bdt} | {ts:.4f} |")
            rows.append(f"| bwd | {L} | {cfg.ng} | {cfg.block_t} | {cfg.num_warps} | {cfg.bdt} | {t:.4f} |")
            print(rows[-2] + "\n" + rows[-1], flush=True)
            best.setdefault("bwd", (t + ts, cfg))
            best["bwd"] = min(best["bwd"], (t + ts, cfg), key=lambda p: p[0])
        print(f"L={L} best: {best}", flush=True)
        rows.append(f"| best L={L} | fwd {best.get('fwd')} | fwd(states)+bwd {best.get('bwd')} |")
        del u, delta, A, Bm, Cm, D, z, bias, dy
        torch.cuda.empty_cache()
    return rows


SPLITS = [1, 2, 4, 8]
SPLIT_FWD = [sst.ScanConfig(4, 16, 1), sst.ScanConfig(4, 8, 1), sst.ScanConfig(2, 16, 1), sst.ScanConfig(2, 8, 1),
             sst.ScanConfig(1, 16, 1)]
SPLIT_BWD = [sst.ScanConfig(4, 8, 1), sst.ScanConfig(4, 4, 1), sst.ScanConfig(2, 8, 1), sst.ScanConfig(2, 4, 1)]


def split_sweep(lengths: List[int], bw_card: float, b: int = 8, fwd_configs=None, bwd_configs=None) -> List[str]:
    """Time tiles x segments per sequence (1: one program walks the whole sequence, as before the split;
    None: the default's choice). Fewer states per thread (smaller ng, block_t) need fewer registers, so
    more programs are resident at once; splitting makes the programs. Bandwidth as in the main table."""
    d, n = 768, 16
    fwd_configs, bwd_configs = fwd_configs or SPLIT_FWD, bwd_configs or SPLIT_BWD
    rows = [f"batch {b}", "", "| L | dtype | pass | ng, block_t, warps | segments | ms | % of copy BW |",
            "| --- | --- | --- | --- | --- | --- | --- |"]

    def row(L, dtype, name, cfg, segs, ms, nbytes):
        pct = 100 * nbytes / (ms * 1e-3) / 1e12 / bw_card
        rows.append(f"| {L} | {str(dtype).replace('torch.', '')} | {name} | {cfg.ng}, {cfg.block_t}, {cfg.num_warps} | "
                    f"{segs or 'default'} | {ms:.4f} | {pct:.0f}% |")
        print(rows[-1], flush=True)

    for L in lengths:
        for dtype in (torch.bfloat16, torch.float32):
            es = torch.tensor([], dtype=dtype).element_size()
            args = make(b, d, L, n, dtype)
            dy = torch.randn_like(args[0])
            for cfg in fwd_configs:
                for segs in SPLITS + [None]:
                    ms = bench(lambda: sst._launch_forward(*args, True, False, config=cfg, segments=segs), rep=100)
                    row(L, dtype, "fwd", cfg, segs, ms, io_bytes(b, d, L, n, es, False))
            for cfg in bwd_configs:
                for segs in SPLITS + [None]:
                    fw = lambda: sst._launch_forward(*args, True, True, save_t=cfg.block_t, segments=segs)  # noqa: E731
                    states = fw()[1]
                    ms = bench(fw, rep=100) + bench(
                        lambda: sst._launch_backward(dy, *args, True, states, config=cfg, segments=segs), rep=100)
                    row(L, dtype, "fwd(states)+bwd", cfg, segs, ms, io_bytes(b, d, L, n, es, True))
            del args, dy, states
            torch.cuda.empty_cache()
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also time several tile configs")
    p.add_argument("--quick", action="store_true", help="L=216 and 1728 only, bf16 only")
    p.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths of the main table (default 54 216 1728 8192)")
    p.add_argument("--split", action="store_true",
                   help="only time the split of sequences across programs (1, 2, ... segments), L 1728 and 8192")
    p.add_argument("--split-batch1", action="store_true",
                   help="only the split at batch 1 (96 programs: fewer than the SMs), default tiles, L 8192")
    a = p.parse_args(argv)
    if not sst.is_available():
        print("needs CUDA and triton", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    head = [f"# Selective scan benchmark", "",
            f"Card: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
            f"triton {__import__('triton').__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "Sizes: batch 8, dim 768, d_state 16; D, z, delta_bias, softplus on; A, D, bias fp32.", ""]
    print("\n".join(head), flush=True)
    bw = copy_bandwidth()
    lengths = a.lengths or ([216, 1728] if a.quick else [54, 216, 1728, 8192])
    dtypes = [torch.bfloat16] if a.quick else [torch.bfloat16, torch.float32]
    rows = []
    if a.split or a.split_batch1:
        rows = ["## Sequences split across programs (median ms)", ""]
        rows += (split_sweep([8192], bw, 1, SPLIT_FWD[:1], SPLIT_BWD[:1]) if a.split_batch1
                 else split_sweep([1728, 8192], bw))
        save_table("\n".join(head + rows) + "\n", "bench_selective_scan_split.md")
        return 0
    if a.sweep:
        rows += ["## Tile sweep (bf16 inputs, median ms)", ""] + sweep([54, 216, 8192]) + [""]
    table = main_table(lengths, dtypes, not a.no_ref, bw)
    rows += ["## Ours vs reference", ""] + table
    text = "\n".join(head + rows) + "\n"
    print("\n" + "\n".join(table))
    save_table(text, "bench_selective_scan.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
