"""Top CUDA kernels of one compiled bf16 training step: pre-training (HyMamba, batch 8, 96^3, mask 0.75)
or fine-tuning (HyMamba segmentation, 14 classes, DiceCE loss, as the engine runs it).

    python benchmarks/profile_pretrain.py [--task finetune] [--channels-last] [--no-compile] [--sparse-full-res]

Prints the step's wall time, the sum of its kernel times (the difference is time the GPU waits for the
host), the kernel time per kind of kernel and the top kernels.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mambamim.models import create_model
from mambamim.pretrain import create_pretrainer

# Kernel kinds by name, first match wins.
KINDS = (
    ("cuDNN conv forward", ("fprop",)),
    ("cuDNN conv input grad", ("dgrad",)),
    ("cuDNN conv weight grad", ("wgrad",)),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "cutlass", "cublas")),
    ("depthwise conv (ours)", ("_dw_",)),
    ("selective scan (ours)", ("scan",)),
    ("Inductor reductions", ("triton_red", "triton_per")),
    ("Inductor pointwise", ("triton_poi",)),
    ("ATen elementwise / copies", ("elementwise", "copy", "memcpy", "memset", "fill")),
    ("pooling", ("pool",)),
    ("normalisation (ATen)", ("norm",)),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-loss", action="store_true", help="fine-tuning: compile the DiceCE loss too")
    parser.add_argument("--sparse-full-res", action="store_true")
    parser.add_argument("--sparse-levels", type=int, default=1, help="encoder levels on visible cells")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--dump", help="write every kernel (ms, calls, name) to this TSV file")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    x = torch.rand(args.batch, 1, 96, 96, 96, device=device)
    if args.task == "pretrain":
        model = create_pretrainer("hymamba", sparse_full_res=args.sparse_full_res,
                                  sparse_levels=args.sparse_levels).to(device)
    else:
        from monai.losses import DiceCELoss

        model = create_model("hymamba", num_classes=14).to(device)
        y = torch.randint(0, 14, (args.batch, 1, 96, 96, 96), device=device)
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        if args.compile_loss:
            dice_ce = torch.compile(dice_ce)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    fwd = model if args.no_compile else torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd(x)
        loss = out["loss"] if args.task == "pretrain" else dice_ce(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = list(prof.key_averages())  # CUDA activity only: kernels and copies
    kernels = sum(e.self_device_time_total for e in events) / 1e3
    convs = sum(e.self_device_time_total for e in events if any(k in e.key.lower() for k in ("conv", "xmma", "implicit",
                                                                                              "sm90", "cudnn"))) / 1e3
    print(f"step wall {wall * 1e3:.1f} ms; kernels {kernels:.1f} ms (convolution-like {convs:.1f} ms); "
          f"host-bound gap {wall * 1e3 - kernels:.1f} ms")
    by_kind: dict[str, list[float]] = {}
    for e in events:
        slot = by_kind.setdefault(kind_of(e.key), [0.0, 0])
        slot[0] += e.self_device_time_total / 1e3
        slot[1] += e.count
    print("| kind of kernel | ms | calls |\n| --- | ---: | ---: |")
    for kind, (ms, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {ms:.1f} | {n} |")
    if args.dump:
        with open(args.dump, "w") as fh:
            for e in sorted(events, key=lambda e: -e.self_device_time_total):
                fh.write(f"{e.self_device_time_total / 1e3:.3f}\t{e.count}\t{e.key}\n")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
