"""Tests of the fused Triton selective scan against a float64 step-by-step loop.

CUDA tests skip without a GPU. One interpreter test (TRITON_INTERPRET=1, CPU tensors) runs in a
subprocess when triton is installed; it skips cleanly otherwise (CI installs no triton).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import List, Optional

import pytest
import torch

from _scan_reference import loop_reference as ref_loop
from mambamim.ops import selective_scan_triton as sst

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")

GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make_inputs(b, d, L, n, device, dtype=torch.float32, with_d=True, with_z=True, with_bias=True,
                softplus=True, seed=0) -> List[Optional[torch.Tensor]]:
    """Random inputs in Mamba's ranges; A, D, delta_bias stay fp32 (parameters)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift)

    u = rn(b, d, L)
    delta = rn(b, d, L, scale=0.5, shift=-1.0) if softplus else rn(b, d, L).abs() * 0.3
    A = -(torch.rand(d, n, generator=g) * 3 + 0.2)
    B = rn(b, n, L)
    C = rn(b, n, L)
    D = rn(d) if with_d else None
    z = rn(b, d, L) if with_z else None
    # without softplus delta + bias must stay positive, or the state grows without bound
    bias = (rn(d, scale=0.3) if softplus else torch.rand(d, generator=g) * 0.1) if with_bias else None
    out = []
    for name, t in zip(GRAD_NAMES, [u, delta, A, B, C, D, z, bias]):
        if t is None:
            out.append(None)
            continue
        t = t.to(device)
        if name in ("u", "delta", "B", "C", "z"):
            t = t.to(dtype)
        out.append(t)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / max(||ref||, 0.1). The floor matters only for (near-)zero references: at L=1
    the exact gradient of A is 0 and the kernel returns fp32 rounding noise (norm ~1e-6 on H100)."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(0.1)).item()


def check_parity(args, softplus, tol_y, tol_g, seed=1):
    """Compare value and every gradient with the float64 loop; returns the errors."""
    args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    y = sst.selective_scan_triton(*args, delta_softplus=softplus)
    assert y.dtype == args[0].dtype and y.shape == args[0].shape
    ref_args = [a.detach().cpu().double().requires_grad_() if a is not None else None for a in args]
    y_ref = ref_loop(*ref_args, delta_softplus=softplus)
    errs = {"y": rel_err(y.cpu(), y_ref)}
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy.to(y.device, y.dtype))
    y_ref.backward(dy.double())
    for name, a, r in zip(GRAD_NAMES, args, ref_args):
        if a is None:
            continue
        assert a.grad is not None, name
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        assert torch.isfinite(a.grad).all(), name
        errs[name] = rel_err(a.grad.cpu(), r.grad)
    bad = {k: v for k, v in errs.items() if not v <= (tol_y if k == "y" else tol_g)}
    assert not bad, f"errors over tolerance: {bad} (all: {errs})"
    return errs


def check_split(args, softplus, segments, tol=1e-5, config=None, save_t=None):
    """Sequences split into segments give the unsplit kernel's values, states and gradients, and
    the float64 loop's. ``config``: the forward's tile; ``save_t``: the states' interval, which is then
    the backward's block_t."""
    fwd = dict(config=config, save_t=save_t)
    bwd = dict(config=sst.ScanConfig(4, save_t, 1) if save_t else None)
    y1, st1 = sst._launch_forward(*args, softplus, store_states=True, **fwd)
    ys, sts = sst._launch_forward(*args, softplus, store_states=True, poison=True, segments=segments, **fwd)
    y_ref = ref_loop(*[a.cpu().double() if a is not None else None for a in args], delta_softplus=softplus)
    assert rel_err(ys.cpu(), y_ref) < tol and rel_err(ys, y1) < tol
    assert torch.isfinite(sts).all() and rel_err(sts, st1) < tol
    dy = torch.randn_like(y1)
    g1 = sst._launch_backward(dy, *args, softplus, st1, **bwd)
    gs = sst._launch_backward(dy, *args, softplus, st1, poison=True, segments=segments, **bwd)
    for name, a, b in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias"], g1, gs):
        if a is not None:
            assert torch.isfinite(b).all() and rel_err(b, a) < tol, (name, rel_err(b, a))


# ---------------------------------------------------------------- CPU (no triton needed)


def test_bad_shapes_raise_value_error():
    u = torch.zeros(2, 4, 5)
    A = torch.zeros(4, 16)
    Bm = torch.zeros(2, 16, 5)
    with pytest.raises(ValueError):
        sst.selective_scan_triton(u, u, torch.zeros(4, 12), Bm, Bm)  # state not a power of two
    with pytest.raises(ValueError):
        sst.selective_scan_triton(u, u, A, torch.zeros(2, 16, 4), Bm)
    with pytest.raises(ValueError):
        sst.selective_scan_triton(u, u, A, Bm, Bm, D=torch.zeros(3))
    with pytest.raises(ValueError):
        sst.selective_scan_triton(u, u, torch.zeros(4, 128), torch.zeros(2, 128, 5), torch.zeros(2, 128, 5))


def test_segments_and_split_rules():
    # no split off CUDA; whole chunks per segment, no empty segment; a count below 1 is refused
    assert sst._segments(torch.device("cpu"), 1, 10**6) == 1
    if HAS_TRITON:
        assert sst._split(10, 3) == (4, 3) and sst._split(10, 40) == (1, 10) and sst._split(9, 4) == (3, 3)
        with pytest.raises(ValueError, match="segments"):
            sst._split(10, 0)


def test_is_available_is_bool():
    assert isinstance(sst.is_available(), bool)
    if not HAS_CUDA:
        assert not sst.is_available()


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs triton; on GPUs the CUDA tests cover it")
def test_interpreter_parity():
    """Kernels under TRITON_INTERPRET=1 on CPU tensors (a subprocess: the flag is read at import)."""
    from _interpreter import run_interpreter_check

    run_interpreter_check(__file__)


def offset_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored one element (2 bytes for bf16) past a 4-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def check_pairs_match_plain(args, softplus=True):
    """bf16 read as int32 pairs (L even, aligned) against plain bf16 loads of the same values (the tensors
    moved 2 bytes off alignment, which turns the pairs off): forward and every gradient."""
    L = args[0].shape[-1]
    moved = [offset_copy(a) if a is not None and a.dtype == torch.bfloat16 else a for a in args]
    assert sst._vec_for(L, 8, *args) >= 2 and sst._vec_for(L, 8, *moved) == 1
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(args[0].shape, generator=g).to(args[0].device, torch.bfloat16)
    outs = []
    for inputs, dy_ in ((args, dy), (moved, offset_copy(dy))):
        y, states = sst._launch_forward(*inputs, softplus, store_states=True)
        outs.append([y, *sst._launch_backward(dy_, *inputs, softplus, states)])
    for name, a, b in zip(["y"] + GRAD_NAMES, *outs):
        if a is not None:
            assert rel_err(a, b.float()) < 1e-3, name  # the same fp32 math; bf16 outputs may differ by an ulp


if HAS_TRITON:  # the kernels' jit helpers exist wherever triton imports
    import triton
    import triton.language as tl

    @triton.jit
    def _softplus_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, POLY: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, sst._softplus(tl.load(x_ptr + offs, mask=mask, other=0.0), POLY), mask=mask)


def softplus_error(device, poly: bool = True) -> float:
    """Largest relative error of the kernels' softplus against float64, over [-40, 40] and the edges (zeros,
    tiny, huge, infinite inputs), relative to max(output, 1e-6) for the polynomial log1p (most of it is exp's:
    e = 2^(-|x| log2(e)) with the argument rounded to fp32, up to 8e-7 relative at x = -14) and to
    max(output, 0.1) for log(1 + e), whose error is absolute (6e-8) where e is tiny."""
    x = torch.cat([torch.linspace(-40, 40, 16001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 17.0, 25.0, 100.0, -100.0, 1e4, float("inf"),
                                 -float("inf")])]).to(device)
    y = torch.empty_like(x)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024, POLY=poly)
    ref = torch.nn.functional.softplus(x.double().cpu())
    err = (y.double().cpu() - ref).abs() / ref.abs().clamp_min(1e-6 if poly else 0.1)
    assert torch.equal(y[-2:].cpu(), torch.tensor([float("inf"), 0.0])), y[-2:]
    return err[:-2].max().item()


def _interpreter_check() -> None:
    """Small parity + poison checks on CPU tensors; run by test_interpreter_parity."""
    for poly in (True, False):
        err = softplus_error("cpu", poly)
        assert err < 1e-6, (poly, err)
        print("interpreter softplus, polynomial" if poly else "interpreter softplus, log", err)
    # odd dim and length: masked channels, a padded last chunk, several chunks
    # L=9: scalar loads and a padded last chunk; L=16: the vector-load path (L % 8 == 0)
    for L, flags in [(9, (True, True, True, True)), (9, (False, False, False, False)),
                     (16, (True, True, True, True))]:
        args = make_inputs(2, 3, L, 4, "cpu", with_d=flags[0], with_z=flags[1], with_bias=flags[2],
                           softplus=flags[3], seed=3)
        errs = check_parity(args, flags[3], 1e-5, 1e-5)
        print("interpreter", flags, errs)
    u, delta, A, B, C, D, z, bias = make_inputs(1, 3, 7, 2, "cpu", seed=4)
    for cfg in (None, sst.ScanConfig(4, 4, 2)):
        y, states = sst._launch_forward(u, delta, A, B, C, D, z, bias, True, store_states=True,
                                        config=cfg, poison=True)
        assert torch.isfinite(y).all() and torch.isfinite(states).all()
    grads = sst._launch_backward(torch.randn_like(y), u, delta, A, B, C, D, z, bias, True, states,
                                 poison=True)
    assert all(torch.isfinite(g).all() for g in grads)
    # sequences split into segments: 3 and 2 of several chunks, a last segment shorter than the others,
    # a segment count above the chunk count; with and without z, bias, softplus
    for segments, flags in [(3, (True, True, True, True)), (2, (False, False, False, False)), (40, (True,) * 4)]:
        args = make_inputs(2, 3, 37, 4, "cpu", with_d=flags[0], with_z=flags[1], with_bias=flags[2],
                           softplus=flags[3], seed=5)
        check_split(args, flags[3], segments)
        check_split(args, flags[3], segments, config=sst.ScanConfig(2, 4, 1), save_t=4)
    print("interpreter split OK")
    # bf16 rows and B / C as int32 pairs (L even) and as plain loads (L odd), against float64 and each other
    for L in (16, 10, 9):
        args = make_inputs(2, 3, L, 4, "cpu", dtype=torch.bfloat16, seed=6)
        print("interpreter bf16", L, check_parity(args, True, 2e-2, 2e-2))
        if L % 2 == 0:
            check_pairs_match_plain(args)
    args = make_inputs(2, 3, 38, 4, "cpu", dtype=torch.bfloat16, seed=7)  # pairs in both first passes
    check_split(args, True, 3, tol=1e-2)
    check_split(args, True, 5, tol=1e-2, config=sst.ScanConfig(2, 4, 1), save_t=4)
    print("interpreter bf16 OK")
    # The public op (a registered custom op with its autograd formula), eager and under
    # torch.compile(fullgraph=True): the compiled graph must hold it without a break.
    args = make_inputs(2, 3, 9, 4, "cpu", seed=3)
    grads = []
    for fn in (sst.selective_scan_triton, torch.compile(sst.selective_scan_triton, fullgraph=True)):
        leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
        fn(*leaves, True).square().sum().backward()
        grads.append([t.grad for t in leaves])
    ref = [a.double().requires_grad_(True) for a in args]
    from mambamim.ops.selective_scan import selective_scan_ref

    selective_scan_ref(*ref, True).square().sum().backward()
    for eager_g, comp_g, r in zip(grads[0], grads[1], ref):
        assert rel_err(eager_g, r.grad) < 1e-5 and rel_err(comp_g, r.grad) < 1e-5
    leaves = [a.clone().requires_grad_(True) for a in args]
    torch.library.opcheck(torch.ops.mambamim.selective_scan.default, (*leaves, True, True))
    print("INTERPRETER OK")


# ---------------------------------------------------------------- CUDA


FLAG_SETS = [
    (True, True, True, True),
    (False, False, False, False),
    (True, False, True, False),
    (False, True, False, True),
]


@cuda_only
@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("L", [1, 37, 216])
def test_cuda_fp32_parity(flags, L):
    args = make_inputs(2, 40, L, 16, "cuda", with_d=flags[0], with_z=flags[1], with_bias=flags[2],
                       softplus=flags[3], seed=L)
    check_parity(args, flags[3], 1e-5, 1e-4)


@cuda_only
@pytest.mark.parametrize("poly", [True, False])
def test_cuda_softplus_matches_float64(poly):
    # both forms (bf16 / fp32 delta) against torch in float64; ex2.approx adds a few ulp to the interpreter's 1e-6
    assert softplus_error("cuda", poly) < 2e-6


@cuda_only
def test_cuda_long_sequence():
    args = make_inputs(1, 24, 1500, 16, "cuda", seed=11)
    check_parity(args, True, 1e-5, 1e-4)


@cuda_only
@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64])
def test_cuda_state_sizes(n):
    args = make_inputs(2, 33, 29, n, "cuda", seed=n)
    check_parity(args, True, 1e-5, 1e-4)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_inputs(dtype):
    # reference on the same (rounded) inputs: the error is the kernel's, not the rounding of inputs
    args = make_inputs(2, 64, 216, 16, "cuda", dtype=dtype, seed=5)
    check_parity(args, True, 1e-2, 1e-2)


@cuda_only
@pytest.mark.parametrize("L", [216, 8192])
def test_cuda_bf16_pairs_match_plain_loads(L):
    check_pairs_match_plain(make_inputs(2, 64, L, 16, "cuda", dtype=torch.bfloat16, seed=8))


@cuda_only
def test_cuda_autocast_bf16():
    args = make_inputs(2, 48, 100, 16, "cuda", seed=6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = sst.selective_scan_triton(*args, delta_softplus=True)
    assert y.dtype == torch.float32
    y_ref = ref_loop(*[a.cpu() if a is not None else None for a in args], delta_softplus=True)
    assert rel_err(y.cpu(), y_ref) < 1e-5
    # bf16 activations with fp32 parameters, as autocast produces them
    mixed = [a.to(torch.bfloat16) if i in (0, 1, 3, 4, 6) else a for i, a in enumerate(args)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        check_parity(mixed, True, 1e-2, 1e-2)


@cuda_only
def test_cuda_non_contiguous():
    b, d, L, n = 2, 40, 50, 16
    u, delta, A, B, C, D, z, bias = make_inputs(b, d, L, n, "cuda", seed=7)
    # same values, transposed storage
    nc = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (u, delta, B, C, z)]
    A_nc = A.t().contiguous().t()
    assert not nc[0].is_contiguous() and not A_nc.is_contiguous()
    check_parity([nc[0], nc[1], A_nc, nc[2], nc[3], D, nc[4], bias], True, 1e-5, 1e-4)


@cuda_only
def test_cuda_poison_every_output_written():
    u, delta, A, B, C, D, z, bias = make_inputs(3, 70, 45, 16, "cuda", seed=8)
    for store, cfg in ((False, None), (True, None), (True, sst.ScanConfig(4, 4, 2))):
        # save_t < block_t (masked stores) and save_t == block_t (stores at chunk starts)
        y, states = sst._launch_forward(u, delta, A, B, C, D, z, bias, True, store_states=store,
                                        config=cfg, poison=True)
        assert torch.isfinite(y).all()
        if store:
            assert torch.isfinite(states).all()
    grads = sst._launch_backward(torch.randn_like(y), u, delta, A, B, C, D, z, bias, True, states, poison=True)
    for name, g in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias"], grads):
        assert torch.isfinite(g).all(), name


@cuda_only
@pytest.mark.parametrize("cfg", [sst.ScanConfig(4, 8, 4, 1), sst.ScanConfig(2, 16, 4, 1),
                                 sst.ScanConfig(1, 8, 2, 1), sst.ScanConfig(4, 4, 4, 2)])
def test_cuda_configs(cfg):
    """Every tile shape the benchmark sweeps gives the same numbers."""
    u, delta, A, B, C, D, z, bias = make_inputs(2, 100, 77, 16, "cuda", seed=9)
    y_ref = ref_loop(u.cpu(), delta.cpu(), A.cpu(), B.cpu(), C.cpu(), D.cpu(), z.cpu(), bias.cpu(), True)
    y, states = sst._launch_forward(u, delta, A, B, C, D, z, bias, True, store_states=True, config=cfg,
                                    poison=True, save_t=cfg.block_t)
    assert rel_err(y.cpu(), y_ref) < 1e-5
    y2, _ = sst._launch_forward(u, delta, A, B, C, D, z, bias, True, store_states=False, config=cfg)
    assert rel_err(y2.cpu(), y_ref) < 1e-5
    dy = torch.randn_like(y)
    g_cfg = sst._launch_backward(dy, u, delta, A, B, C, D, z, bias, True, states, config=cfg, poison=True)
    _, states_d = sst._launch_forward(u, delta, A, B, C, D, z, bias, True, store_states=True)
    g_def = sst._launch_backward(dy, u, delta, A, B, C, D, z, bias, True, states_d)
    for a, b in zip(g_cfg, g_def):
        assert rel_err(a, b) < 1e-5


@cuda_only
@pytest.mark.parametrize("segments", [2, 5])
def test_cuda_split_sequences(segments):
    """Sequences split across programs: same values, states and gradients as one program per sequence,
    fp32 and bf16, with the default tiles (states every 8 steps) and a config saving every 4."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        args = make_inputs(2, 40, 1100, 16, "cuda", dtype=dtype, seed=12)
        check_split(args, True, segments, tol)
        check_split(args, True, segments, tol, config=sst.ScanConfig(4, 16, 1), save_t=4)


@cuda_only
def test_cuda_long_sequences_split_by_default():
    # few programs on a long sequence split; the benchmark's 768 programs (faster unsplit) and short ones do not
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert sst._segments(torch.device("cuda"), 96, 8192) == max(1, min(16, 6 * sms // 96))  # 8 on 132 SMs
    assert sst._segments(torch.device("cuda"), 8 * 96, 8192) == max(1, min(16, 6 * sms // 768))  # 1 there
    assert sst._segments(torch.device("cuda"), 96, 216) == 1
    args = make_inputs(1, 8, 4096, 16, "cuda", seed=13)
    check_parity(args, True, 1e-5, 1e-4)


@cuda_only
def test_cuda_deterministic():
    args = [a.requires_grad_() if a is not None else None
            for a in make_inputs(2, 64, 100, 16, "cuda", seed=10)]
    outs = []
    for _ in range(2):
        for a in args:
            if a is not None:
                a.grad = None
        y = sst.selective_scan_triton(*args, delta_softplus=True)
        y.sum().backward()
        outs.append([y.detach().clone()] + [a.grad.clone() for a in args if a is not None])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


if __name__ == "__main__" and "--interpreter-check" in sys.argv:
    _interpreter_check()
