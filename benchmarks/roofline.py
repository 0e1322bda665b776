"""Roofline table of a pre-training (or fine-tuning) step: for the ops that take the most GPU time, their time, the bytes
they read and write, their FLOPs and the fraction of the card's memory or matrix limit they reach.

    python benchmarks/roofline.py [--task finetune] [--size base] [--crop 96] [--batch 8] [--rows 10] [--ncdhw]

Method. The step (bf16 autocast, channels_last, sparse full resolution on ``--sparse-levels`` levels,
fused AdamW) runs eagerly under a TorchDispatchMode that brackets every ATen / custom op, forward and
backward, with CUDA events. Per op: time = the events' interval; bytes = the sizes of every tensor it
takes and returns (what it must move at least, with no re-reads); FLOPs = torch.utils.flop_counter's
formula where one exists (matmuls, convolutions in any dimension with groups, their backward), our own
for the selective scan and the depthwise convolution, 0 for the rest. The limits are measured on the card
in the same run: a 2 GiB device copy (read + write) and an 8192^3 bf16 matmul. The achieved fraction is
that of the op's own bound: bytes / time over the copy rate, or FLOPs / time over the matrix rate, the
larger of the two. Ops are grouped by (name, shapes); a row's time sums its calls.

Eager, not compiled: Inductor fuses the elementwise ops (whose rows here therefore overstate them) but
calls the same convolutions, matmuls and our Triton kernels, which is where the table points. The compiled
step's own kernel list comes from benchmarks/profile_pretrain.py. Channels-last is what the engine runs
compiled; eagerly it runs NCDHW (``--ncdhw``), and eager ops that want contiguous inputs (``F.group_norm``)
copy channels-last ones, rows that neither the compiled nor the eager engine step has.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from _report import save_table


def _tensors(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _nbytes(args, kwargs, out) -> int:
    seen, total = set(), 0
    for t in _tensors((args, kwargs, out)):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key not in seen:  # an in-place op returns its input: count it once
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _custom_flops(name: str, args) -> float:
    """FLOPs of our own ops, which flop_counter does not know. The backward ops take the output gradient
    first: (dy, u, delta, A, ...) and (gy, x, weight)."""
    back = name.endswith("_backward")
    if name.startswith("mambamim::selective_scan"):
        u, A = (args[1], args[3]) if back else (args[0], args[2])
        # exp, two multiply-adds of the state and the C-sum per (b, d, t, n); about twice that backward
        return float((20 if back else 9) * u.numel() * A.shape[-1])
    if name.startswith("mambamim::depthwise_conv3d"):
        x, w = (args[1], args[2]) if back else (args[0], args[1])
        return float((4 if back else 2) * x.numel() * math.prod(w.shape[1:]))  # backward: input and weight grads
    return 0.0


def _flops(func, args, kwargs, out) -> float:
    packet = getattr(func, "_overloadpacket", None)
    if packet in flop_registry:
        try:
            return float(flop_registry[packet](*args, **kwargs, out_val=out))
        except Exception:  # a formula that does not fit this overload's arguments
            return 0.0
    return _custom_flops(str(func.name()) if hasattr(func, "name") else str(func), args)


class OpTimer(TorchDispatchMode):
    """Times every op it dispatches with CUDA events (wall time on a CPU) and keeps bytes and FLOPs."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.records: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        out = func(*args, **kwargs)
        if cuda:
            end.record()
            timing = (start, end)
        else:
            timing = time.perf_counter() - t0
        shapes = tuple(tuple(t.shape) for t in _tensors(args)[:3])
        self.records.append((str(func.name()), shapes, timing, _nbytes(args, kwargs, out), _flops(func, args, kwargs, out)))
        return out

    def rows(self) -> list:
        """[(name, shapes, calls, seconds, bytes, flops)] summed over calls of one (name, shapes)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        acc = defaultdict(lambda: [0, 0.0, 0, 0.0])
        for name, shapes, timing, nbytes, flops in self.records:
            secs = timing[0].elapsed_time(timing[1]) / 1e3 if isinstance(timing, tuple) else timing
            slot = acc[(name, shapes)]
            slot[0] += 1
            slot[1] += secs
            slot[2] += nbytes
            slot[3] += flops
        return sorted(((n, s, *v) for (n, s), v in acc.items()), key=lambda r: -r[3])


def card_limits(device: torch.device) -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), measured now."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

    def best(fn, n=10):
        times = []
        for _ in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e) / 1e3)
        return min(times[2:])

    copy = 2 * src.numel() / best(lambda: dst.copy_(src))
    matmul = 2 * 8192**3 / best(lambda: a @ a)
    del src, dst, a
    return copy, matmul


def _model_and_loss(args):
    """(model, loss(model, x)): the pre-trainer (its own loss) or the segmentation network with DiceCE."""
    if args.task == "pretrain":
        from mambamim.pretrain import create_pretrainer

        model = create_pretrainer("hymamba", size=args.size, sparse_full_res=True, sparse_levels=args.sparse_levels)
        return model, lambda m, x: m(x)["loss"]
    from monai.losses import DiceCELoss

    from mambamim.models import create_model

    model = create_model("hymamba", size=args.size, num_classes=14)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    y = torch.randint(0, 14, (args.batch, 1, args.crop, args.crop, args.crop), generator=torch.Generator().manual_seed(0))
    return model, lambda m, x: dice_ce(m(x).float(), y.to(x.device))


def build_step(args, device):
    model, loss_of = _model_and_loss(args)
    model = model.to(device)
    cuda = device.type == "cuda"
    layout = torch.channels_last_3d if cuda and not args.ncdhw else torch.contiguous_format
    model = model.to(memory_format=layout)
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, device=device).contiguous(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    def step():
        with amp():
            loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _wall(step, device, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def table(rows, step_s: float, copy: float, matmul: float, n: int) -> list[str]:
    total = sum(r[3] for r in rows)
    out = [f"eager step {step_s * 1e3:.1f} ms; ops timed {total * 1e3:.1f} ms over {len(rows)} (op, shapes) "
           f"groups; copy rate {copy / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s (measured now)",
           "| # | op | input shapes | calls | ms | share | MB moved | GFLOP | GB/s | TFLOP/s | bound | of limit |",
           "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for i, (name, shapes, calls, secs, nbytes, flops) in enumerate(rows[:n], 1):
        bw, fl = nbytes / secs, flops / secs
        mem_frac, mat_frac = bw / copy, fl / matmul
        bound = "matrix" if mat_frac > mem_frac else "memory"
        frac = max(mem_frac, mat_frac)
        shape_txt = " ".join("x".join(map(str, s)) for s in shapes)
        out.append(f"| {i} | {name} | {shape_txt} | {calls} | {secs * 1e3:.2f} | {secs / total:.1%} | "
                   f"{nbytes / 1e6:.0f} | {flops / 1e9:.1f} | {bw / 1e9:.0f} | {fl / 1e12:.1f} | {bound} | "
                   f"{frac:.0%} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain",
                        help="finetune: the segmentation network, 14 classes, DiceCE")
    parser.add_argument("--size", default="base")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sparse-levels", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--ncdhw", action="store_true", help="NCDHW activations (the eager engine's layout), not channels-last")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    copy, matmul = card_limits(device)
    step = build_step(args, device)
    for _ in range(3):
        step()
    step_s = _wall(step, device, 5)
    timer = OpTimer(device)
    with timer:
        step()
    lines = table(timer.rows(), step_s, copy, matmul, args.rows)
    print("\n".join(lines), flush=True)
    save_table("\n".join(lines), "roofline.md")


if __name__ == "__main__":
    main()
