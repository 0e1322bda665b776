"""Registers and stack of the selective-scan kernels, compiled for a GPU without one (no device needed).

Triton compiles each kernel for the target (default sm_90, the H100 / H200) and ``cuobjdump`` from Triton's
own CUDA tools reads the cubin's resource usage. Registers bound how many warps an SM holds (65,536 a SM:
255 registers a thread leave room for 8 one-warp programs); a nonzero stack is a spill. The device's Triton
may allocate a little differently from the one installed here.

    python benchmarks/scan_registers.py [--arch 90] [--tiles 4,16 4,8 2,8] [--sass] [--dtype fp32]

``--sass`` also counts the SASS instructions: the whole kernel's (static), its chunk loop's (the longest loop:
what each chunk costs a warp in issue slots, without the prologue) and the loop's by opcode, shuffles (SHFL)
and spills (LDL / STL) among them. ``--dtype fp32`` builds for fp32 activations (default bf16: u, delta, B, C,
z and their gradients). ``--lines KERNEL`` counts one kernel's instructions (or one opcode's, ``--opcode SHFL``)
by the source line they come from (nvdisasm's line table): how the fifteenth session found the reverse scan's
shuffles and libdevice's log.

    python benchmarks/scan_registers.py --lines backward --tiles 4,8 [--opcode SHFL] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Dict, List, Optional

from _report import save_table

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mambamim.ops import selective_scan_triton as sst

_U_SHAPED = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dy_ptr", "y_ptr", "du_ptr", "ddelta_ptr", "dz_ptr"}
_FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)


_OPCODES = ["MUFU", "FFMA", "FMUL", "FADD", "SHFL", "LDS", "STS", "BAR", "LDG", "STG", "LDL", "STL"]


def _cubin(fn, constexprs: Dict[str, object], arch: int, act: str = "bf16") -> bytes:
    """Compile ``fn`` for sm_<arch>, one warp, activations in ``act`` (bf16 or fp32) and fp32 the rest."""
    if act not in ("bf16", "fp32"):
        raise ValueError(f"act must be bf16 or fp32, got {act!r}")
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{act}" if name in _U_SHAPED else "*fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 1}).asm["cubin"]


def _cuda_tool(name: str, cubin: bytes, *flags: str) -> str:
    """Output of one of the CUDA tools Triton ships (cuobjdump, nvdisasm) run on ``cubin``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True).stdout


def resource_usage(fn, constexprs: Dict[str, object], arch: int, act: str = "bf16") -> str:
    """cuobjdump's registers and stack bytes of ``fn`` compiled for sm_<arch>, as 'REG | STACK'."""
    out = _cuda_tool("cuobjdump", _cubin(fn, constexprs, arch, act), "--dump-resource-usage")
    line = next((x for x in out.splitlines() if "REG:" in x), "")
    fields = dict(kv.split(":") for kv in line.split() if kv.startswith(("REG:", "STACK:")))
    return f"{fields.get('REG', '?')} | {fields.get('STACK', '?')}"


_OPCODE = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def sass(fn, constexprs: Dict[str, object], arch: int, act: str = "bf16", lines: bool = False) -> str:
    """nvdisasm's listing of ``fn`` compiled for sm_<arch> (with ``lines``, each source line marked)."""
    return _cuda_tool("nvdisasm", _cubin(fn, constexprs, arch, act), *(["-g"] if lines else []), "-c")


def _count_opcodes(listing: List[str]) -> Counter:
    return Counter(m.group(1) for m in map(_OPCODE.match, listing) if m)


def opcode_counts(fn, constexprs: Dict[str, object], arch: int, act: str = "bf16") -> Counter:
    """How many SASS instructions of each opcode the kernel holds (static counts: the chunk loop dominates)."""
    return _count_opcodes(sass(fn, constexprs, arch, act).splitlines())


def _longest_loop(listing: List[str]) -> List[str]:
    """The lines of the longest loop of a listing: a label and the last branch back to it."""
    labels = {line[:-1]: i for i, line in enumerate(listing) if re.match(r"\.L_x_\d+:$", line)}
    best: List[str] = []
    for i, line in enumerate(listing):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > len(best):
            best = listing[labels[m.group(1)]:i + 1]
    return best


def loop_counts(fn, constexprs: Dict[str, object], arch: int, act: str = "bf16") -> Counter:
    """Opcode counts of the kernel's chunk loop (its longest loop), without the prologue (the first chunk's
    loads, the program's tiles) that the static counts include."""
    return _count_opcodes(_longest_loop(sass(fn, constexprs, arch, act).splitlines()))


def by_source_line(fn, constexprs: Dict[str, object], arch: int, opcode: Optional[str] = None,
                   act: str = "bf16") -> Counter:
    """SASS instructions (all, or one opcode) per (file, line) of the source they were compiled from."""
    out = sass(fn, constexprs, arch, act, lines=True)
    counts: Counter = Counter()
    where = ("?", 0)
    for line in out.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            where = (m.group(1), int(m.group(2)))
        elif re.match(r"\s+/\*[0-9a-f]{4}\*/", line) and (opcode is None or re.search(rf"\b{opcode}\b", line)):
            counts[where] += 1
    return counts


def print_lines(fn, constexprs: Dict[str, object], arch: int, opcode: Optional[str], rows: int = 25,
                act: str = "bf16") -> None:
    counts = by_source_line(fn, constexprs, arch, opcode, act)
    print(f"{sum(counts.values())} {opcode or 'instructions'} by source line")
    for (path, line), n in counts.most_common(rows):
        text = ""
        if os.path.exists(path):
            with open(path) as src:
                text = (src.read().splitlines()[line - 1:line] or [""])[0].strip()
        print(f"{n:6d}  {os.path.basename(path)}:{line}  {text[:100]}")


def kernels(ng: int, block_t: int):
    nl = 16 // ng
    tiles = dict(N=16, NG=ng, NL=nl, BLOCK_D=max(1, 32 // nl), BLOCK_T=block_t, VEC=8)
    fwd = dict(_FLAGS, STORE_STATES=False, SAVE_T=block_t)
    yield "forward", sst._ss_fwd_kernel, dict(fwd, SPLIT=False, FIRST_PASS=False, **tiles)
    yield "forward, split", sst._ss_fwd_kernel, dict(fwd, SPLIT=True, FIRST_PASS=False, **tiles)
    yield "forward saving states", sst._ss_fwd_kernel, dict(fwd, STORE_STATES=True, SPLIT=False, FIRST_PASS=False,
                                                             **tiles)
    yield "forward first pass", sst._ss_fwd_kernel, dict(fwd, HAS_D=False, HAS_Z=False, SPLIT=False, FIRST_PASS=True,
                                                          **tiles)
    yield "backward", sst._ss_bwd_kernel, dict(_FLAGS, SPLIT=False, **tiles)
    yield "backward, split", sst._ss_bwd_kernel, dict(_FLAGS, SPLIT=True, **tiles)
    yield "backward first pass", sst._ss_bwd_seg_kernel, dict(HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, **tiles)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--tiles", nargs="+", default=["4,16", "4,8"], help="ng,block_t pairs (d_state 16, 1 warp)")
    p.add_argument("--sass", action="store_true",
                   help="also count SASS instructions: the kernel's, its chunk loop's, and the loop's by opcode")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="activations' dtype (default bf16)")
    p.add_argument("--lines", metavar="KERNEL", help="count one kernel's instructions by source line (e.g. backward)")
    p.add_argument("--opcode", help="with --lines: count only this opcode (e.g. SHFL)")
    a = p.parse_args(argv)
    if a.lines:
        for pair in a.tiles:
            ng, block_t = (int(x) for x in pair.split(","))
            found = [(fn, c) for name, fn, c in kernels(ng, block_t) if name == a.lines]
            if not found:
                p.error(f"no kernel named {a.lines!r}")
            print(f"{a.lines}, tile ({ng}, {block_t}), {a.dtype}, sm_{a.arch}, triton {triton.__version__}")
            print_lines(*found[0], a.arch, a.opcode, act=a.dtype)
        return 0
    ops = _OPCODES if a.sass else []
    sass_cols = ["all", "chunk loop", "loop per element"] + [f"{o} (loop)" for o in ops]
    rows = [f"sm_{a.arch}, triton {triton.__version__}, d_state 16, one warp, every flag on, {a.dtype} activations", "",
            "| kernel | ng | block_t | registers | stack bytes |" + "".join(f" {c} |" for c in sass_cols if a.sass),
            "| --- | --- | --- | --- | --- |" + " --- |" * (len(sass_cols) if a.sass else 0)]
    for pair in a.tiles:
        ng, block_t = (int(x) for x in pair.split(","))
        for name, fn, constexprs in kernels(ng, block_t):
            row = f"| {name} | {ng} | {block_t} | {resource_usage(fn, constexprs, a.arch, a.dtype)} |"
            if a.sass:
                listing = sass(fn, constexprs, a.arch, a.dtype).splitlines()  # one build for both counts
                loop = _count_opcodes(_longest_loop(listing))
                n_loop = sum(loop.values())
                row += (f" {sum(_count_opcodes(listing).values())} | {n_loop} |"
                        f" {n_loop / (ng * block_t):.1f} |" + "".join(f" {loop[o]} |" for o in ops))
            rows.append(row)
            print(rows[-1], flush=True)
    save_table("\n".join(rows), "scan_registers.md")
    print("\n".join(rows[:2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
