"""benchmarks/scan_registers.py: the selective scan's default tiles compile for sm_90 without spilling where
they did before the split (needs triton, which CI does not install; no GPU)."""

from __future__ import annotations

import importlib.util

import pytest

from _bench_loader import load_benchmark

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture(scope="module")
def regs():
    return load_benchmark("scan_registers")


def test_unsplit_forward_does_not_spill(regs):
    # the default forward tile (ng 4, block_t 16): a runtime segment start in the unsplit kernel took it from
    # 168 to 246 registers with Triton 3.6, and to a 24-byte spill at 254 with 3.9; SPLIT as a constexpr
    # undid both. Whichever Triton is installed, the unsplit forward must not spill.
    kernels = {name: (fn, c) for name, fn, c in regs.kernels(4, 16)}
    fn, constexprs = kernels["forward"]
    reg, stack = (int(x) for x in regs.resource_usage(fn, constexprs, 90).split(" | "))
    assert reg <= 255 and stack == 0
