"""Dense 3^3 convolutions of the pre-training step's full-resolution level, one pass at a time, through
cuDNN: channels-last 3D against the default NCDHW layout (the baseline, same run).

Times forward, input gradient and weight gradient separately (bf16, batch 8, 96^3 unless told) with
CUDA events and prints TFLOP/s: what the dense design's floor is made of. A Triton implicit-GEMM kernel
for these shapes was tried against it (commit 04964f2, RESULTS.md) and did not beat cuDNN.

    python benchmarks/bench_conv3d.py [--batch 8] [--side 96] [--cases 48x48 96x48 64x48 32x64]
"""

from __future__ import annotations

import argparse

import torch

from _report import save_table
from profile_modules import median_ms


def _conv(x, w):
    return torch.ops.aten.convolution(x, w, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)


def _backward(dy, x, w, mask):
    return torch.ops.aten.convolution_backward(dy, x, w, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, mask)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--side", type=int, default=96)
    p.add_argument("--cases", nargs="+", default=["48x48", "96x48", "64x48", "32x64"], help="C_in x C_out")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    rows = ["| conv (C_in x C_out) | pass | NCDHW ms (baseline) | channels-last ms | TFLOP/s NCDHW / channels-last |",
            "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for case in args.cases:
        cin, cout = (int(v) for v in case.split("x"))
        s = args.side
        x = torch.randn(args.batch, cin, s, s, s, device=dev, dtype=torch.bfloat16)
        w = torch.randn(cout, cin, 3, 3, 3, device=dev, dtype=torch.bfloat16) / (27 * cin) ** 0.5
        dy = torch.randn(args.batch, cout, s, s, s, device=dev, dtype=torch.bfloat16)
        cl = [t.contiguous(memory_format=torch.channels_last_3d) for t in (x, w, dy)]
        flop = 2 * 27 * cin * cout * args.batch * s**3
        passes = {
            "forward": lambda x, w, dy: _conv(x, w),
            "input grad": lambda x, w, dy: _backward(dy, x, w, [True, False, False]),
            "weight grad": lambda x, w, dy: _backward(dy, x, w, [False, True, False]),
        }
        for name, fn in passes.items():
            t_nc = median_ms(lambda: fn(x, w, dy), iters=10)
            t_cl = median_ms(lambda: fn(*cl), iters=10)
            tflops = f"{flop / t_nc / 1e9:.0f} / {flop / t_cl / 1e9:.0f}"
            row = f"| {cin} x {cout} | {name} | {t_nc:.2f} | {t_cl:.2f} | {tflops} |"
            print(row, flush=True)
            rows.append(row)
    table = "\n".join(rows)
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch}, {args.side}^3, bf16\n{table}")
    save_table(table, "bench_conv3d.md")


if __name__ == "__main__":
    main()
