"""Multi-GPU scaling of the pre-training step (DDP through torchrun), synthetic data.

    torchrun --nproc_per_node 1 benchmarks/bench_ddp.py   # then
    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py

Each rank runs HyMamba pre-training steps (batch per GPU 8, 96^3, mask 0.75, bf16 autocast,
channels-last) and rank 0 prints crops/s; the scaling efficiency is throughput(N) / (N * throughput(1)).
With ``--append FILE`` rank 0 appends a line ``world crops_per_s step_s`` to FILE.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from mambamim.pretrain import create_pretrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8, help="crops per GPU")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--size", default="base")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    device = torch.device("cuda", local_rank)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = create_pretrainer("hymamba", size=args.size).to(device).to(memory_format=torch.channels_last_3d)
    ddp = DDP(model, device_ids=[local_rank], gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device=device).manual_seed(dist.get_rank())
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, device=device, generator=g)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = ddp(x)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = torch.tensor(statistics.median(times), device=device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        crops = args.batch * world / step.item()
        print(f"world {world}: step {step.item():.3f} s, {crops:.1f} crops/s ({torch.cuda.get_device_name(device)})")
        if args.append:
            with open(args.append, "a") as f:
                f.write(f"{world} {crops:.3f} {step.item():.4f}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
