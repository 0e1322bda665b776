"""Registers and stack of the selective-scan kernels, compiled for a GPU without one (no device needed).

Triton compiles each kernel for the target (default sm_90, the H100 / H200) and ``cuobjdump`` from Triton's
own CUDA tools reads the cubin's resource usage. Registers bound how many warps an SM holds (65,536 a SM:
255 registers a thread leave room for 8 one-warp programs); a nonzero stack is a spill. The device's Triton
may allocate a little differently from the one installed here.

    python benchmarks/scan_registers.py [--arch 90] [--tiles 4,16 4,8 2,8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

from _report import save_table

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mambamim.ops import selective_scan_triton as sst

_U_SHAPED = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dy_ptr", "y_ptr", "du_ptr", "ddelta_ptr", "dz_ptr"}
_FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)


def resource_usage(fn, constexprs: Dict[str, object], arch: int) -> str:
    """Compile ``fn`` (bf16 activations, fp32 the rest) and return cuobjdump's REG / STACK line."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in _U_SHAPED else "*fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 1})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((x for x in out.splitlines() if "REG:" in x), "")
    fields = dict(kv.split(":") for kv in line.split() if kv.startswith(("REG:", "STACK:")))
    return f"{fields.get('REG', '?')} | {fields.get('STACK', '?')}"


def kernels(ng: int, block_t: int):
    nl = 16 // ng
    tiles = dict(N=16, NG=ng, NL=nl, BLOCK_D=max(1, 32 // nl), BLOCK_T=block_t, VEC=8)
    fwd = dict(_FLAGS, STORE_STATES=False, SAVE_T=block_t)
    yield "forward", sst._ss_fwd_kernel, dict(fwd, SPLIT=False, **tiles)
    yield "forward, split", sst._ss_fwd_kernel, dict(fwd, SPLIT=True, **tiles)
    yield "forward saving states", sst._ss_fwd_kernel, dict(fwd, STORE_STATES=True, SPLIT=False, **tiles)
    yield "forward first pass", sst._ss_fwd_seg_kernel, dict(HAS_BIAS=True, SOFTPLUS=True, **tiles)
    yield "backward", sst._ss_bwd_kernel, dict(_FLAGS, SPLIT=False, **tiles)
    yield "backward, split", sst._ss_bwd_kernel, dict(_FLAGS, SPLIT=True, **tiles)
    yield "backward first pass", sst._ss_bwd_seg_kernel, dict(HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, **tiles)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--tiles", nargs="+", default=["4,16", "4,8"], help="ng,block_t pairs (d_state 16, 1 warp)")
    a = p.parse_args(argv)
    rows = [f"sm_{a.arch}, triton {triton.__version__}, d_state 16, one warp, every flag on", "",
            "| kernel | ng | block_t | registers | stack bytes |", "| --- | --- | --- | --- | --- |"]
    for pair in a.tiles:
        ng, block_t = (int(x) for x in pair.split(","))
        for name, fn, constexprs in kernels(ng, block_t):
            rows.append(f"| {name} | {ng} | {block_t} | {resource_usage(fn, constexprs, a.arch)} |")
            print(rows[-1], flush=True)
    save_table("\n".join(rows), "scan_registers.md")
    print("\n".join(rows[:2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
