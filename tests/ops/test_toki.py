"""TOKI (paper Eq. 8, SPEC 2.5): vectorised toki_fill against a plain per-run loop."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from mambamim.masking import gather_visible, scatter_visible
from mambamim.ops.toki import TOKI, LearnableMaskToken, toki_fill


def toki_fill_reference(tokens: torch.Tensor, visible: torch.Tensor, A: torch.Tensor, edge_token: torch.Tensor):
    """Straight from Eq. 8: a Python loop over samples and runs of masked tokens.

    tokens (B, L, C), visible (B, L) bool, A (C, C), edge_token (C,) -> (B, L, C).
    """
    B, L, C = tokens.shape
    out = tokens.clone()
    for b in range(B):
        t = 0
        while t < L:
            if visible[b, t]:
                t += 1
                continue
            start = t
            while t < L and not visible[b, t]:
                t += 1
            q = t - start  # masked tokens start .. t-1
            y_left = tokens[b, start - 1] if start > 0 else edge_token
            y_right = tokens[b, t] if t < L else edge_token
            z = y_left
            for n in range(1, q + 1):
                s_n = ((q + 2 - n) * y_left + n * y_right) / (q + 2)
                z = A @ z + s_n
                out[b, start + n - 1] = z
    return out


def _case(B, L, C, visible, seed=0, dtype=torch.float64, a_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, L, C, generator=g, dtype=dtype)
    A = a_scale * torch.randn(C, C, generator=g, dtype=dtype) / C**0.5
    edge = torch.randn(C, generator=g, dtype=dtype)
    return tokens, visible, A, edge


def _runs(vis_row):
    """(start, length) of every masked run in a 1-D bool row."""
    runs, t, L = [], 0, len(vis_row)
    while t < L:
        if vis_row[t]:
            t += 1
            continue
        s = t
        while t < L and not vis_row[t]:
            t += 1
        runs.append((s, t - s))
    return runs


def test_matches_reference_random_masks():
    g = torch.Generator().manual_seed(1)
    B, L, C = 6, 29, 5
    visible = torch.rand(B, L, generator=g) < 0.35
    visible[0, :4] = False  # run at the start
    visible[0, 4] = True
    visible[1, -5:] = False  # run at the end
    visible[2] = False
    visible[2, 10] = True  # a single visible token: edge runs on both sides
    visible[3] = True  # all visible
    visible[4] = True
    visible[4, 1::3] = False  # runs of length 1
    visible[5] = False  # nothing visible: edge token on both sides
    runs = [r for b in range(B) for r in _runs(visible[b].tolist())]
    assert any(s == 0 for s, _ in runs) and any(s + q == L for s, q in runs) and any(q == 1 for _, q in runs)
    tokens, visible, A, edge = _case(B, L, C, visible)
    out = toki_fill(tokens, visible, A, edge)
    ref = toki_fill_reference(tokens, visible, A, edge)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # visible tokens are returned bit-exactly; the all-visible row is untouched
    assert torch.equal(out[visible], tokens[visible])
    assert torch.equal(out[3], tokens[3])


@pytest.mark.parametrize("L", [1, 2, 3, 8, 9, 33])
def test_matches_reference_lengths(L):
    g = torch.Generator().manual_seed(L)
    visible = torch.rand(4, L, generator=g) < 0.5
    tokens, visible, A, edge = _case(4, L, 3, visible, seed=L)
    torch.testing.assert_close(
        toki_fill(tokens, visible, A, edge), toki_fill_reference(tokens, visible, A, edge), rtol=1e-10, atol=1e-10
    )


def test_long_run_uses_high_powers():
    # a single run of 20 masked tokens needs A^1 .. A^20: exercises every doubling step
    L, C = 24, 4
    visible = torch.zeros(1, L, dtype=torch.bool)
    visible[0, 1] = True
    visible[0, 22] = True
    tokens, visible, A, edge = _case(1, L, C, visible, seed=3, a_scale=0.9)
    torch.testing.assert_close(
        toki_fill(tokens, visible, A, edge), toki_fill_reference(tokens, visible, A, edge), rtol=1e-10, atol=1e-10
    )


def test_zero_A_is_linear_interpolation():
    C = 3
    tokens = torch.zeros(1, 7, C, dtype=torch.float64)
    visible = torch.tensor([[False, True, False, False, False, True, False]])
    tokens[0, 1] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    tokens[0, 5] = torch.tensor([5.0, 6.0, -1.0], dtype=torch.float64)
    edge = torch.tensor([-2.0, 0.5, 0.0], dtype=torch.float64)
    out = toki_fill(tokens, visible, torch.zeros(C, C, dtype=torch.float64), edge)
    yl, yr = tokens[0, 1], tokens[0, 5]
    for n in (1, 2, 3):  # Q = 3 between positions 1 and 5
        assert torch.equal(out[0, 1 + n], ((5 - n) * yl + n * yr) / 5)
    # start run (Q = 1): edge -> tokens[1]; end run (Q = 1): tokens[5] -> edge
    assert torch.equal(out[0, 0], (2 * edge + yl) / 3)
    assert torch.equal(out[0, 6], (2 * yr + edge) / 3)


def test_matrix_convention():
    # z_1 = A z_0 + s_1 with A acting on the channel column vector (not A.T)
    C = 2
    visible = torch.tensor([[True, False, True]])
    tokens = torch.tensor([[[1.0, 0.0], [9.0, 9.0], [0.0, 0.0]]], dtype=torch.float64)
    A = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # A @ e0 = e1
    out = toki_fill(tokens, visible, A, torch.zeros(C, dtype=torch.float64))
    s1 = torch.tensor([2 / 3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 1.0], dtype=torch.float64) + s1)


def test_nan_at_masked_positions_is_ignored():
    g = torch.Generator().manual_seed(2)
    B, L, C = 3, 12, 4
    visible = torch.rand(B, L, generator=g) < 0.4
    visible[:, 0] = False
    visible[:, 5] = True
    tokens, visible, A, edge = _case(B, L, C, visible, dtype=torch.float32)
    clean = tokens.clone()
    tokens = tokens.masked_fill(~visible.unsqueeze(-1), float("nan"))
    tokens.requires_grad_(True)
    A.requires_grad_(True)
    edge.requires_grad_(True)
    out = toki_fill(tokens, visible, A, edge)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, toki_fill(clean, visible, A.detach(), edge.detach()))
    out.square().sum().backward()
    for grad in (tokens.grad, A.grad, edge.grad):
        assert torch.isfinite(grad).all()
    assert torch.equal(tokens.grad[~visible], torch.zeros_like(tokens.grad[~visible]))


def test_gradients_reach_A_and_edge_and_gradcheck():
    visible = torch.tensor([[False, True, False, False, True, False], [True, False, False, False, False, True]])
    tokens, visible, A, edge = _case(2, 6, 3, visible, seed=5)
    A = torch.zeros_like(A)  # zero init, as in TOKI: the gradient must still reach A
    for p in (tokens, A, edge):
        p.requires_grad_(True)
    toki_fill(tokens, visible, A, edge).sum().backward()
    assert A.grad.abs().sum() > 0 and edge.grad.abs().sum() > 0
    A = (0.4 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, a, e: toki_fill(t, visible, a, e), (tokens, A, edge))


def test_bf16_autocast_keeps_dtype_and_visible():
    module = TOKI(8)
    with torch.no_grad():
        module.A.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 10, 8, generator=g).to(torch.bfloat16)
    visible = torch.rand(2, 10, generator=g) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(tokens, visible)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[visible], tokens[visible])
    ref = toki_fill_reference(tokens.double(), visible, module.A.detach().double(), module.edge_token.detach().double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_toki_module_init_and_validation():
    m = TOKI(16)
    assert torch.equal(m.A, torch.zeros(16, 16))
    assert 0 < m.edge_token.abs().max() <= 0.04
    with pytest.raises(ValueError):
        TOKI(0)
    with pytest.raises(ValueError):
        m(torch.randn(2, 5, 16), torch.ones(2, 5))  # not bool
    with pytest.raises(ValueError):
        toki_fill(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), torch.zeros(3, 3), torch.zeros(4))


def test_learnable_mask_token_ablation():
    m = LearnableMaskToken(6)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 9, 6, generator=g)
    visible = torch.rand(3, 9, generator=g) < 0.5
    tokens_nan = tokens.masked_fill(~visible.unsqueeze(-1), float("nan"))
    out = m(tokens_nan, visible)
    assert torch.equal(out[visible], tokens[visible])
    masked = out[~visible]
    assert masked.shape[0] > 1
    assert torch.equal(masked, m.mask_token.detach().expand_as(masked))
    out.sum().backward()
    assert torch.equal(m.mask_token.grad, torch.full((6,), float((~visible).sum())))


def test_gather_scatter_visible_roundtrip():
    g = torch.Generator().manual_seed(0)
    B, L, C, K = 3, 11, 2, 4
    visible = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        visible[b, torch.randperm(L, generator=g)[:K]] = True
    tokens = torch.randn(B, L, C, generator=g)
    vt = gather_visible(tokens, visible, K)
    assert vt.shape == (B, K, C)
    for b in range(B):
        assert torch.equal(vt[b], tokens[b][visible[b]])  # scan order kept
    back = scatter_visible(vt, visible)
    assert torch.equal(back, tokens * visible.unsqueeze(-1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    visible = torch.rand(4, 64, generator=g) < 0.25
    tokens, visible, A, edge = _case(4, 64, 16, visible, dtype=torch.float32)
    out = toki_fill(tokens.cuda(), visible.cuda(), A.cuda(), edge.cuda())
    torch.testing.assert_close(out.cpu(), toki_fill(tokens, visible, A, edge), rtol=1e-4, atol=1e-4)


HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_cases(device, dtype):
    """(tokens, visible, A, edge, label) covering long runs, runs at both ends, all-masked and all-visible
    samples, C not a multiple of the tile, L + 2 not a power of two, and a sequence long enough (702 padded)
    that the interpolation kernel narrows its channel tile; the last case's longest run is 2 tokens, so the
    persistent kernel stops after two of its seven steps."""
    g = torch.Generator().manual_seed(5)
    for B, L, C, ratio in [(3, 30, 20, 0.75), (2, 62, 70, 0.9), (2, 7, 3, 0.5), (2, 700, 20, 0.75), (3, 100, 40, 0)]:
        visible = torch.rand(B, L, generator=g) > ratio
        if ratio == 0:
            visible[:, ::4] = False
            visible[:, 1::4] = False  # runs of 2
        else:
            visible[0] = False  # no visible token at all
        visible[-1, :2] = True
        if B > 2:
            visible[1] = True  # nothing to fill
        tokens, visible, A, edge = _case(B, L, C, visible, seed=L, dtype=torch.float32, a_scale=0.5)
        tokens[~visible] = float("nan")  # must reach nothing
        yield (tokens.to(device=device, dtype=dtype), visible.to(device), A.to(device), edge.to(device), (B, L, C))


def _check_triton_against_reference(device, dtype, fill):
    for tokens, visible, A, edge, label in _triton_cases(device, dtype):
        out = fill(tokens, visible, A, edge)
        ref = toki_fill_reference(tokens.double().cpu().nan_to_num(), visible.cpu(), A.double().cpu(), edge.double().cpu())
        assert out.dtype == tokens.dtype and torch.equal(out[visible], tokens[visible]), label
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol, msg=str(label))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_forward_on_cuda(dtype):
    """Without a gradient, toki_fill on CUDA takes the Triton forward: the loop reference, visible tokens
    bit-exact; with a gradient it takes the differentiable version, and both agree."""
    from mambamim.ops import toki

    def fill(tokens, visible, A, edge):
        assert toki._use_triton(tokens, visible, A, edge)
        with torch.no_grad():
            return toki_fill(tokens, visible, A.requires_grad_(True), edge)

    _check_triton_against_reference("cuda", dtype, fill)
    tokens, visible, A, edge, _ = next(_triton_cases("cuda", dtype))
    A.requires_grad_(True)
    assert not toki._use_triton(tokens, visible, A, edge)
    assert not toki._use_triton(tokens, visible.cpu(), A.detach(), edge)  # mixed devices: the PyTorch path
    with torch.no_grad():
        fast = toki_fill(tokens, visible, A, edge)
    torch.testing.assert_close(toki_fill(tokens, visible, A, edge).detach(), fast, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_persistent_kernel_matches_one_launch_per_step(dtype):
    """The persistent kernel (grid barrier between steps) computes bit for bit what one launch per step does,
    whatever number of programs shares the units; repeated calls agree (no state left in the barrier)."""
    from mambamim.ops.toki_triton import toki_fill_triton

    for tokens, visible, A, edge, label in _triton_cases("cuda", dtype):
        stepwise = toki_fill_triton(tokens, visible, A, edge, fused=False)
        for programs in (1, 3, 17, None, None):
            out = toki_fill_triton(tokens, visible, A, edge, fused=True, programs=programs)
            assert torch.equal(out.nan_to_num(), stepwise.nan_to_num()), (label, programs)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("path", ["toki_fill", "per step", "persistent"])
def test_triton_forward_in_a_cuda_graph(path):
    """toki_fill (the persistent kernel, then a plain launch of one program per SM) and both Triton forwards
    capture into a CUDA graph and replay what toki_fill computes eagerly."""
    from functools import partial

    from mambamim.ops.toki_triton import toki_fill_triton

    fill = toki_fill if path == "toki_fill" else partial(toki_fill_triton, fused=path == "persistent")
    tokens, visible, A, edge, _ = next(_triton_cases("cuda", torch.float32))
    with torch.no_grad():
        eager = toki_fill(tokens, visible, A, edge)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fill(tokens, visible, A, edge)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fill(tokens, visible, A, edge)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.nan_to_num(), eager.nan_to_num())


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="needs triton; on GPUs the CUDA tests cover it")
def test_triton_interpreter_parity():
    """The Triton kernels under TRITON_INTERPRET=1 on CPU tensors (a subprocess: the flag is read at import)."""
    from _interpreter import run_interpreter_check  # here: benchmarks/bench_toki.py loads this module

    run_interpreter_check(__file__)


def _interpreter_check() -> None:
    from functools import partial

    from mambamim.ops.toki_triton import toki_fill_triton

    # programs run one after another here: the persistent kernel's barrier needs a grid of one
    fused = partial(toki_fill_triton, fused=True, programs=1)
    _check_triton_against_reference("cpu", torch.float32, fused)
    _check_triton_against_reference("cpu", torch.float32, partial(toki_fill_triton, fused=False))
    for tokens, visible, A, edge, label in _triton_cases("cpu", torch.float32):
        assert torch.equal(fused(tokens, visible, A, edge), toki_fill_triton(tokens, visible, A, edge, fused=False)), label
    print("INTERPRETER OK")


if __name__ == "__main__" and "--interpreter-check" in sys.argv:
    _interpreter_check()
