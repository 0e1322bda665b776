"""Bytes of activations the pre-training step keeps for its backward pass, by module (eager), or, with
``--compiled``, the largest tensors the compiled step keeps (what Inductor's partitioner saves, optionally
under ``--memory-budget``; traced through AOT autograd with Inductor's decompositions and min-cut
partitioner, run without Inductor's code generation).

Device-independent (it counts what autograd saves, by storage, under bf16 autocast on the chosen
device), so it runs on a CPU at batch 1 and scales linearly with the batch. The GPU's peak adds the
weights, AdamW state, gradients and the backward's temporaries, and torch.compile saves a different set
(it recomputes cheap pointwise ops), so this tells where memory goes, not the peak itself. Autocast's
op lists differ by device (on CPU, max_pool3d runs in fp32 and saves an fp32 copy of its input; on
CUDA it stays bf16), so a CPU count is an estimate of the GPU's.

    python benchmarks/saved_activations.py [--batch 1] [--sparse-full-res] [--device cpu]
    python benchmarks/saved_activations.py --compiled [--memory-budget 0.5]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from mambamim.pretrain import create_pretrainer


def compiled_saved(model, x, memory_budget: float, rows: int = 12) -> None:
    """Print the bytes the compiled forward graph(s) keep for the backward pass, and the largest tensors."""
    from mambamim.runtime.compiling import kept_tensors_backend

    backend, kept = kept_tensors_backend()
    with torch._functorch.config.patch(activation_memory_budget=memory_budget):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            torch.compile(model, backend=backend)(x)
    total = sum(k[0] for k in kept)
    b = x.shape[0]
    print(f"compiled step keeps {total / 2**30:.2f} GiB at batch {b} ({total * 8 / b / 2**30:.1f} GiB for batch 8), "
          f"activation memory budget {memory_budget}\n\n| tensor | shape | dtype | MiB |\n| --- | --- | --- | ---: |")
    for nbytes, name, shape, dtype in sorted(kept, key=lambda k: -k[0])[:rows]:
        print(f"| {name} | {shape} | {dtype} | {nbytes / 2**20:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--size", default="base")
    parser.add_argument("--sparse-full-res", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compiled", action="store_true", help="what the compiled step keeps instead (channels-last)")
    parser.add_argument("--memory-budget", type=float, default=1.0, help="with --compiled: activation memory budget")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_pretrainer("hymamba", size=args.size, sparse_full_res=args.sparse_full_res).to(device)
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, device=device)
    if args.compiled:
        cl = torch.channels_last_3d
        compiled_saved(model.to(memory_format=cl), x.contiguous(memory_format=cl), args.memory_budget)
        return

    stack: list[str] = []
    seen: set[int] = set()
    by_module: dict[str, int] = defaultdict(int)
    groups = {"encoder.stem": "enc stem", "encoder.widen.0": "enc full-res widen", "encoder.stages.0": "enc 1/2",
              "encoder.widen.1": "enc 1/2", "encoder.stages.1": "enc 1/4", "encoder.widen.2": "enc 1/4",
              "encoder.stages.2": "enc 1/8", "encoder.widen.3": "enc 1/8", "encoder.stages.3": "enc 1/16",
              "encoder.mamba": "Mamba stage", "fill": "TOKI", "decoder.ups.3": "dec full-res up",
              "decoder.fuse.3": "dec full-res fuse", "decoder.proj_skips.3": "dec full-res skip proj",
              "decoder.head": "dec head", "decoder.ups.2": "dec 1/2", "decoder.fuse.2": "dec 1/2",
              "decoder.proj_skips.2": "dec 1/2"}  # fmt: skip
    for name, mod in model.named_modules():
        if name in groups:
            mod.register_forward_pre_hook(lambda m, a, label=groups[name]: stack.append(label))
            mod.register_forward_hook(lambda m, a, o: stack.pop() and None)  # None keeps the output

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.device.type == device.type:
            seen.add(key)
            by_module[stack[-1] if stack else "other (masks, skips, decoder 1/4 and coarser, loss)"] += (
                t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x)
    del out
    total = sum(by_module.values())
    print(f"saved activations, batch {args.batch}, {args.crop}^3, bf16 autocast, eager, "
          f"sparse_full_res={args.sparse_full_res}: {total / 2**30:.2f} GiB "
          f"(x{8 // args.batch if args.batch < 8 else 1} for batch 8: {total * 8 / args.batch / 2**30:.1f} GiB)\n")  # fmt: skip
    print("| part | GiB at this batch | share |\n| --- | ---: | ---: |")
    for k, v in sorted(by_module.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v / 2**30:.3f} | {100 * v / total:.0f} % |")


if __name__ == "__main__":
    main()
