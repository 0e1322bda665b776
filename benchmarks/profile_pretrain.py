"""Top CUDA kernels of one compiled bf16 pre-training step (HyMamba, batch 8, 96^3, mask 0.75).

    python benchmarks/profile_pretrain.py [--channels-last] [--no-compile]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mambamim.pretrain import create_pretrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    model = create_pretrainer("hymamba").to(device)
    x = torch.rand(args.batch, 1, 96, 96, 96, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    fwd = model if args.no_compile else torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd(x)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
