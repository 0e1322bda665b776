"""Matrix-work floors of the step targets: how fast each workload could run if every matmul and convolution
ran at the card's full bf16 matrix rate, and what fraction of that rate a time target therefore asks for.

    python benchmarks/flop_floor.py [--size base] [--batch 8] [--crop 96] [--volume 256 256 160] [--rate 790]

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions in any
dimension, forward and backward; elementwise work, the depthwise kernels and the selective scan count 0,
so the floors are lower bounds) on one crop on the CPU, then scaled to the batch. The sliding window counts
its windows with MONAI's own ``sliding_window_inference`` on an empty volume. ``--rate`` is the matrix rate in
TFLOP/s (the issue's measured H200 figure by default); on CUDA ``--measure`` also times an 8192^3 bf16 matmul.
Prints a markdown table (and writes it to $OUT/flop_floor.md when OUT is set).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from _report import save_table
from roofline import card_limits


def _count(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def pretrain_flops(size: str, crop: int, sparse_levels: int | None) -> float:
    """Forward + backward FLOPs of one pre-training crop (mask 0.75; dense when ``sparse_levels`` is None)."""
    from mambamim.pretrain import create_pretrainer

    torch.manual_seed(0)
    model = create_pretrainer("hymamba", size=size, sparse_full_res=sparse_levels is not None,
                              sparse_levels=sparse_levels or 1)
    x = torch.rand(1, 1, crop, crop, crop)
    return _count(lambda: model(x)["loss"].backward())


def finetune_flops(size: str, crop: int, train: bool) -> float:
    """FLOPs of one fine-tuning crop, 14 classes: forward + backward (``train``) or the forward alone."""
    from mambamim.models import create_model

    torch.manual_seed(0)
    model = create_model("hymamba", size=size, num_classes=14)
    x = torch.rand(1, 1, crop, crop, crop)
    if train:
        return _count(lambda: model(x).float().sum().backward())
    with torch.no_grad():
        return _count(lambda: model(x))


def window_count(volume: tuple[int, int, int], crop: int, overlap: float) -> int:
    """Windows ``sliding_window_inference`` runs over ``volume`` (MONAI's own tiling, not a formula)."""
    from monai.inferers import sliding_window_inference

    seen = []

    def predictor(window: torch.Tensor) -> torch.Tensor:
        seen.append(window.shape[0])
        return window

    sliding_window_inference(torch.zeros(1, 1, *volume), (crop,) * 3, 1, predictor, overlap=overlap, mode="gaussian")
    return sum(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--volume", type=int, nargs=3, default=[256, 256, 160])
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=790.0, help="bf16 matrix rate, TFLOP/s")
    parser.add_argument("--measure", action="store_true", help="on CUDA: use the measured matmul rate instead")
    args = parser.parse_args()
    measure = args.measure and torch.cuda.is_available()  # roofline's 8192^3 bf16 matmul, timed now
    rate = card_limits(torch.device("cuda"))[1] / 1e12 if measure else args.rate

    b, c = args.batch, args.crop
    windows = window_count(tuple(args.volume), c, args.overlap)
    rows = [  # (workload, TFLOP, target s)
        (f"pre-training step, sparse on 2 levels (the engine's CUDA-graph default), batch {b}",
         b * pretrain_flops(args.size, c, 2) / 1e12, 0.10),
        (f"pre-training step, sparse full resolution only, batch {b}", b * pretrain_flops(args.size, c, 1) / 1e12, 0.10),
        (f"pre-training step, dense encoder, batch {b}", b * pretrain_flops(args.size, c, None) / 1e12, 0.10),
        (f"fine-tuning step, {b} crops, 14 classes", b * finetune_flops(args.size, c, True) / 1e12, 0.10),
        (f"sliding window {'x'.join(map(str, args.volume))}, roi {c}, overlap {args.overlap}: {windows} windows",
         windows * finetune_flops(args.size, c, False) / 1e12, 0.25),
    ]
    lines = [f"Matrix rate {rate:.0f} TFLOP/s ({'measured' if measure else 'given'}); {args.size} HyMamba, "
             f"{c}^3 crops; FLOPs of matmuls and convolutions only.", "",
             "| workload | TFLOP | floor at the matrix rate | target | fraction of the matrix rate the target needs |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for what, tflop, target in rows:
        floor = tflop / rate
        lines.append(f"| {what} | {tflop:.1f} | {floor * 1e3:.0f} ms | {target * 1e3:.0f} ms | {floor / target:.0%} |")
    text = "\n".join(lines)
    print(text, flush=True)
    save_table(text, "flop_floor.md")


if __name__ == "__main__":
    main()
