"""Time toki_fill against the plain per-run loop (Eq. 8) at the pre-training shape.

Default: batch 8, 6x6x6 bottleneck grid (L = 216), 384 channels, mask 0.75, on CUDA when
present, else CPU. Prints a table of medians (CUDA events on GPU, perf_counter on CPU) and
the largest difference between the two implementations. On CUDA it also times the two Triton
forwards directly, eagerly and in CUDA graphs: one launch per doubling step (the fallback,
`toki_fill_triton(..., fused=False)`) and the persistent kernel (toki_fill's path), the latter
also on its worst case, a sample with no visible token.

    python benchmarks/bench_toki.py [--device cuda] [--dtype bf16] [--compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from mambamim.masking import random_bottleneck_mask
from mambamim.ops import toki_triton
from mambamim.ops.toki import toki_fill


def _load_reference() -> Callable:
    path = Path(__file__).resolve().parents[1] / "tests" / "ops" / "test_toki.py"
    spec = importlib.util.spec_from_file_location("_toki_test_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.toki_fill_reference


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _longest_run(visible: torch.Tensor) -> int:
    longest = 0
    for row in visible.cpu().tolist():
        run = 0
        for v in row:
            run = 0 if v else run + 1
            longest = max(longest, run)
    return longest


def _triton_paths(tokens, visible, A, edge) -> dict[str, Callable[[], object]]:
    """The two Triton forwards, called directly: one launch per doubling step (the baseline) and the persistent
    kernel, on the benchmark's mask and on the same mask with one sample all masked (its worst case: every
    step runs)."""
    empty = visible.clone()
    empty[0] = False
    fill = toki_triton.toki_fill_triton
    with torch.no_grad():  # a fast wrong kernel must not pass for a result
        for mask, label in ((visible, "the benchmark's mask"), (empty, "a sample all masked")):
            same = torch.equal(fill(tokens, mask, A, edge, fused=True), fill(tokens, mask, A, edge, fused=False))
            print(f"persistent kernel bit-identical to the per-step launches on {label}: {same}")
    return {
        "a launch per step": lambda: fill(tokens, visible, A, edge, fused=False),
        "persistent kernel": lambda: fill(tokens, visible, A, edge, fused=True),
        "persistent, a sample all masked": lambda: fill(tokens, empty, A, edge, fused=True),
    }


def _graphed(fn: Callable[[], object], device: torch.device) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn captured in a CUDA graph (after warm-up on a side stream), replayed once; also proves that it has no
    host syncs or host-to-device copies. Returns the graph and the captured call's output."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = fn()
    graph.replay()
    torch.cuda.synchronize(device)
    return graph, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grid", type=int, default=6, help="bottleneck grid side (L = grid^3)")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the tokens")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--ref-repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(toki_fill)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (reduce-overhead adds CUDA graphs)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph replay timing")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    B, L, C = args.batch, args.grid**3, args.channels
    visible = random_bottleneck_mask(B, (args.grid,) * 3, args.mask_ratio, generator=g).view(B, L).to(device)
    tokens = torch.randn(B, L, C, generator=g).to(device=device, dtype=dtype)
    A = (0.2 * torch.randn(C, C, generator=g) / C**0.5).to(device).requires_grad_(True)
    edge = (0.02 * torch.randn(C, generator=g)).to(device).requires_grad_(True)
    tokens_grad = tokens.detach().clone().requires_grad_(True)
    reference = _load_reference()

    with torch.no_grad():
        ref_out = reference(tokens.float(), visible, A.float(), edge.float())
        out = toki_fill(tokens, visible, A, edge)
    max_diff = (out.float() - ref_out).abs().max().item()

    def fwd() -> None:
        with torch.no_grad():
            toki_fill(tokens, visible, A, edge)

    def fwd_bwd() -> None:
        y = toki_fill(tokens_grad, visible, A, edge)
        y.float().square().mean().backward()

    def ref() -> None:
        with torch.no_grad():
            reference(tokens.float(), visible, A, edge)

    rows = [("reference loop (fwd)", _time(ref, device, args.ref_repeats, 1))]
    rows.append(("toki_fill eager (fwd)", _time(fwd, device, args.repeats, 10)))
    triton_paths = _triton_paths(tokens, visible, A, edge) if device.type == "cuda" and toki_triton.supports(tokens) else {}
    for label, fn in triton_paths.items():
        rows.append((f"Triton, {label} (fwd)", _time(fn, device, args.repeats, 10)))
    rows.append(("toki_fill eager (fwd+bwd)", _time(fwd_bwd, device, args.repeats, 10)))
    if args.compile:
        mode = None if args.compile_mode == "default" else args.compile_mode
        compiled = torch.compile(toki_fill, fullgraph=True, mode=mode)

        def cfwd() -> None:
            with torch.no_grad():
                compiled(tokens, visible, A, edge)

        def cfwd_bwd() -> None:
            compiled(tokens_grad, visible, A, edge).float().square().mean().backward()

        rows.append(("toki_fill compiled (fwd)", _time(cfwd, device, args.repeats, 10)))
        rows.append(("toki_fill compiled (fwd+bwd)", _time(cfwd_bwd, device, args.repeats, 10)))

    if device.type == "cuda" and not args.no_cuda_graph:
        for label, fn in triton_paths.items():
            graph, _ = _graphed(fn, device)
            rows.append((f"Triton, {label}, CUDA graph", _time(graph.replay, device, args.repeats, 10)))
        graph, static_out = _graphed(lambda: toki_fill(tokens, visible, A, edge), device)
        graph_diff = (static_out.float() - ref_out).abs().max().item()
        print(f"CUDA graph replay: max |out - reference| = {graph_diff:.3e}")
        rows.append(("toki_fill CUDA graph (fwd)", _time(graph.replay, device, args.repeats, 10)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"TOKI benchmark on {name}: B={B} L={L} C={C} mask={args.mask_ratio} tokens {args.dtype}")
    print(f"max |toki_fill - reference| = {max_diff:.3e}; longest masked run {_longest_run(visible)} of {L} tokens")
    ref_ms = statistics.median(rows[0][1])
    print(f"{'variant':<45} {'median ms':>10} {'min ms':>9} {'runs':>5} {'vs reference':>13}")
    for label, times in rows:
        med = statistics.median(times)
        print(f"{label:<45} {med:>10.3f} {min(times):>9.3f} {len(times):>5} {ref_ms / med:>12.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
