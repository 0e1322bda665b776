"""benchmarks/scan_registers.py and what it shows of the selective scan's sm_90 builds: no spill in the default
forward, no shuffles in the adjoint scan, the per-line and chunk-loop counts, the softplus form per dtype (needs
triton, which CI does not install; no GPU)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from _bench_loader import load_benchmark

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture(scope="module")
def regs():
    return load_benchmark("scan_registers")


def test_unsplit_forward_does_not_spill(regs):
    # the default forward tile (ng 4, block_t 16): a runtime segment start in the unsplit kernel took it from
    # 168 to 246 registers with Triton 3.6, and to a 24-byte spill at 254 with 3.9; SPLIT as a constexpr
    # undid both. Since bf16 comes in int32 pairs, 3.6 builds it at 245 registers without a spill and 3.9 at
    # 168 with one spilled word (an LDL and an STL): more than that in the chunk loop fails.
    kernels = {name: (fn, c) for name, fn, c in regs.kernels(4, 16)}
    fn, constexprs = kernels["forward"]
    reg, _ = (int(x) for x in regs.resource_usage(fn, constexprs, 90).split(" | "))
    counts = regs.opcode_counts(fn, constexprs, 90)
    assert reg <= 255 and counts["LDL"] + counts["STL"] <= 2, counts


@pytest.mark.parametrize("name", ["backward", "backward first pass"])
def test_adjoint_scan_needs_no_shuffles(regs, name):
    # The adjoint runs along the time axis, which lives inside each thread: the only shuffles left are the
    # sums over the state (y, dB, dC terms), 256 a chunk at the backward's default tile (ng 4, block_t 8).
    # Triton 3.6 lowered `reverse=True` there with 460 more (716), and 328 in the first pass (8 without).
    kernels = {n: (fn, c) for n, fn, c in regs.kernels(4, 8)}
    fn, constexprs = kernels[name]
    shuffles = regs.opcode_counts(fn, constexprs, 90)["SHFL"]
    assert shuffles <= (300 if name == "backward" else 40), shuffles


def test_instructions_by_source_line_add_up(regs):
    # the per-line count (how the reverse scan's shuffles and libdevice's log were found) covers every
    # instruction the opcode count sees
    fn, constexprs = {n: (f, c) for n, f, c in regs.kernels(4, 16)}["forward"]
    opcodes = regs.opcode_counts(fn, constexprs, 90)
    assert sum(regs.by_source_line(fn, constexprs, 90).values()) == sum(opcodes.values())
    assert 0 < sum(regs.by_source_line(fn, constexprs, 90, "SHFL").values()) == opcodes["SHFL"]


def test_chunk_loop_is_counted(regs):
    # the chunk loop, not the whole kernel, is what each chunk costs: it holds every exp of a chunk (one per
    # (t, n) a lane: block_t x ng = 64, plus the softplus and gating ones) and less than the static count,
    # whose prologue loads the first chunk (the fifteenth session's per-element figures counted that too)
    fn, constexprs = {n: (f, c) for n, f, c in regs.kernels(4, 16)}["forward"]
    for act in ("bf16", "fp32"):
        loop = regs.loop_counts(fn, constexprs, 90, act)
        static = regs.opcode_counts(fn, constexprs, 90, act)
        assert 64 <= loop["MUFU"] <= 80 and sum(loop.values()) < sum(static.values())


def test_softplus_form_follows_delta_dtype(regs):
    # the polynomial log1p (its coefficient -0.0295885 is an immediate in the SASS) where delta is bf16, and
    # libdevice's log where it is fp32: the faster form for each (H100, sixteenth session). The polynomial runs
    # on the 2-D (block_t, BLOCK_D) tile, at most 4 values a lane, not on the 4-D tile where each is repeated.
    fn, constexprs = {n: (f, c) for n, f, c in regs.kernels(4, 16)}["forward"]

    def uses(act):
        return len(re.findall(r"-0\.029588", regs.sass(fn, constexprs, 90, act)))

    assert 1 <= uses("bf16") <= 4 and uses("fp32") == 0
