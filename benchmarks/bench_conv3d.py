"""Dense 3^3 convolutions of the pre-training step's full-resolution level, one by one: cuDNN in both
memory layouts against the implicit-GEMM Triton kernels (``mambamim.ops.conv3d_igemm_triton``).

Times forward, input gradient and weight gradient separately (bf16, batch 8, 96^3 unless told) with
CUDA events and prints TFLOP/s. Baseline in the same run: cuDNN through ``aten.convolution`` /
``aten.convolution_backward`` with ``cudnn.benchmark`` on.

    python benchmarks/bench_conv3d.py [--batch 8] [--side 96] [--cases 48x48 96x48 64x48 32x64]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from _report import save_table

from mambamim.ops.conv3d_igemm_triton import conv3d_igemm_forward, conv3d_igemm_input_grad, conv3d_igemm_weight_grad


def bench(fn, iters: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--side", type=int, default=96)
    p.add_argument("--cases", nargs="+", default=["48x48", "96x48", "64x48", "32x64"])
    p.add_argument("--quick", action="store_true", help="one Triton configuration per pass")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    rows = ["| conv (C_in x C_out) | pass | cuDNN channels-last ms | cuDNN NCDHW ms | Triton ms (config) | "
            "TFLOP/s cuDNN CL / Triton | max rel. err. Triton vs cuDNN |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    configs = [*itertools.product((64, 128, 256), (4, 8), (3,)), (128, 4, 4), (128, 8, 4)]
    if args.quick:
        configs = [(128, 4, 3)]
    for case in args.cases:
        cin, cout = (int(v) for v in case.split("x"))
        s = args.side
        x = torch.randn(args.batch, cin, s, s, s, device=dev, dtype=torch.bfloat16)
        xcl = x.contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn(cout, cin, 3, 3, 3, device=dev, dtype=torch.bfloat16) / (27 * cin) ** 0.5
        wcl = w.contiguous(memory_format=torch.channels_last_3d)
        dy = torch.randn(args.batch, cout, s, s, s, device=dev, dtype=torch.bfloat16)
        dycl = dy.contiguous(memory_format=torch.channels_last_3d)
        flop = 2 * 27 * cin * cout * args.batch * s**3

        def conv(xx, ww):
            return torch.ops.aten.convolution(xx, ww, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)

        def bwd(g, xx, ww, mask):
            return torch.ops.aten.convolution_backward(g, xx, ww, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1,
                                                       mask)  # fmt: skip

        ref_y = conv(xcl, wcl)
        ref_dx, ref_dw, _ = bwd(dycl, xcl, wcl, [True, True, False])
        passes = {
            "forward": (lambda: conv(xcl, wcl), lambda: conv(x, w), ref_y,
                        lambda cfg: conv3d_igemm_forward(xcl, w, block_m=cfg[0], num_warps=cfg[1], num_stages=cfg[2])),
            "input grad": (lambda: bwd(dycl, xcl, wcl, [True, False, False]), lambda: bwd(dy, x, w, [True, False, False]),
                           ref_dx, lambda cfg: conv3d_igemm_input_grad(dycl, w, block_m=cfg[0], num_warps=cfg[1],
                                                                       num_stages=cfg[2])),
            "weight grad": (lambda: bwd(dycl, xcl, wcl, [False, True, False]), lambda: bwd(dy, x, w, [False, True, False]),
                            ref_dw, lambda cfg: conv3d_igemm_weight_grad(xcl, dycl, block_m=cfg[0], num_warps=cfg[1],
                                                                         num_stages=cfg[2])),
        }  # fmt: skip
        for name, (cudnn_cl, cudnn_nc, ref, triton_fn) in passes.items():
            t_cl, t_nc = bench(cudnn_cl), bench(cudnn_nc)
            best, best_cfg, err = float("inf"), None, float("nan")
            for cfg in configs:
                try:
                    t = bench(lambda: triton_fn(cfg), iters=5, warmup=2)
                except Exception as e:  # a configuration that runs out of shared memory or registers
                    print(f"{case} {name} {cfg}: {type(e).__name__}", flush=True)
                    continue
                if t < best:
                    best, best_cfg = t, cfg
            if best_cfg is not None:
                out = triton_fn(best_cfg).float()
                err = ((out - ref.float()).abs().max() / ref.float().abs().max()).item()
            row = (f"| {cin} x {cout} | {name} | {t_cl:.2f} | {t_nc:.2f} | {best:.2f} {best_cfg} | "
                   f"{flop / t_cl / 1e9:.0f} / {flop / best / 1e9:.0f} | {err:.1e} |")  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    table = "\n".join(rows)
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch}, {args.side}^3, bf16\n{table}")
    save_table(table, "bench_conv3d.md")


if __name__ == "__main__":
    main()
