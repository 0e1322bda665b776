"""Fast convolution paths against float64 ``F.conv3d``: the im2col GEMM (any device), the Triton
depthwise kernels (CUDA; plus one interpreter run on CPU tensors when triton is installed), and the
dispatch inside SparseConv3d."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from _interpreter import run_interpreter_check

from mambamim.layers.sparse import SparseConv3d
from mambamim.ops.conv3d import depthwise_conv3d, depthwise_conv3d_ref, im2col_conv3d

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(*leaves)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("cin,k,bias", [(1, 3, True), (2, 3, False), (1, 5, True), (3, 1, True)])
def test_im2col_matches_conv3d_with_gradients(cin, k, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, 5, 6, 7, generator=g, dtype=torch.float64)
    w = torch.randn(4, cin, k, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64) if bias else None
    args = (x, w) + ((b,) if bias else ())
    y, grads = _grads(lambda *t: im2col_conv3d(t[0], t[1], t[2] if bias else None), *args)
    r, rgrads = _grads(lambda *t: F.conv3d(t[0], t[1], t[2] if bias else None, padding=k // 2), *args)
    torch.testing.assert_close(y, r, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, rgrads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", [0, 2])
def test_im2col_other_paddings(padding):
    """padding=0 is the "valid" convolution the sparse stem runs on blocks that carry a halo."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 6, 5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    y, grads = _grads(lambda *t: im2col_conv3d(*t, padding=padding), x, w, b)
    r, rgrads = _grads(lambda *t: F.conv3d(*t, padding=padding), x, w, b)
    torch.testing.assert_close(y, r, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, rgrads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="smaller"):
        im2col_conv3d(torch.zeros(1, 1, 2, 4, 4), w, padding=0)


def test_im2col_rejects_bad_shapes():
    with pytest.raises(ValueError, match="im2col_conv3d"):
        im2col_conv3d(torch.zeros(1, 2, 4, 4, 4), torch.zeros(3, 1, 3, 3, 3))
    with pytest.raises(ValueError, match="im2col_conv3d"):
        im2col_conv3d(torch.zeros(1, 1, 4, 4, 4), torch.zeros(3, 1, 2, 2, 2))


def test_depthwise_cpu_is_the_reference_and_checks_shapes():
    x = torch.randn(1, 3, 4, 5, 6)
    w = torch.randn(3, 1, 3, 3, 3)
    torch.testing.assert_close(depthwise_conv3d(x, w), depthwise_conv3d_ref(x, w))
    with pytest.raises(ValueError, match="depthwise_conv3d"):
        depthwise_conv3d(x, torch.randn(4, 1, 3, 3, 3))
    with pytest.raises(ValueError, match="odd"):
        depthwise_conv3d(x, torch.randn(3, 1, 2, 2, 2))


def _depthwise_case(b, c, shape, k, device, dtype, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, *shape, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(c, 1, k, k, k, generator=g) * 0.3).to(device)
    bias = torch.randn(c, generator=g).to(device)
    gy = torch.randn(b, c, *shape, generator=g).to(device=device, dtype=dtype)
    return x, w, bias, gy


def _reference64(x, w, bias, gy):
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_(True) for t in (x, w, bias))
    y = depthwise_conv3d_ref(x64, w64, b64)
    y.backward(gy.double().cpu())
    return y.detach(), x64.grad, w64.grad, b64.grad


def _rel(a, ref):
    return ((a.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-3)).item()


@cuda_only
@pytest.mark.parametrize("c,shape,k", [(5, (7, 9, 11), 3), (70, (6, 6, 6), 3), (64, (12, 20, 17), 3),
                                       (16, (4, 5, 6), 1)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_depthwise_matches_float64(c, shape, k, dtype):
    x, w, bias, gy = _depthwise_case(2, c, shape, k, "cuda", dtype)
    xl, wl, bl = (t.detach().clone().requires_grad_(True) for t in (x, w, bias))
    out = depthwise_conv3d(xl, wl, bl)
    out.backward(gy)
    ry, rgx, rgw, rgb = _reference64(x, w, bias, gy)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert _rel(out, ry) < tol
    assert _rel(xl.grad, rgx) < tol
    assert _rel(wl.grad, rgw) < tol * 5  # long reductions in the weight gradient
    assert _rel(bl.grad, rgb) < tol * 5
    assert wl.grad.dtype == torch.float32


@cuda_only
def test_triton_depthwise_under_autocast_and_compile():
    x, w, bias, gy = _depthwise_case(2, 32, (8, 8, 8), 3, "cuda", torch.float32, channels_last=True)
    conv = SparseConv3d(32, 32, 3, padding=1, groups=32).cuda()
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(bias)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = conv(x)
        compiled = torch.compile(conv)(x)
    assert eager.dtype == torch.bfloat16
    ref = depthwise_conv3d_ref(x.double().cpu(), w.double().cpu(), bias.double().cpu())
    assert _rel(eager, ref) < 1e-2
    torch.testing.assert_close(compiled, eager)
    xl = x.clone().requires_grad_(True)
    torch.compile(conv)(xl).backward(gy)
    assert torch.isfinite(xl.grad).all() and conv.weight.grad is not None


@cuda_only
def test_sparse_conv_fast_paths_match_float64():
    """The layer's CUDA fast paths (im2col stem, Triton depthwise) against float64 on the CPU (cuDNN's
    own fp32 result would differ by TF32 rounding)."""
    torch.manual_seed(0)

    def ref(x, conv, groups=1):
        return F.conv3d(x.double().cpu(), conv.weight.double().cpu(), conv.bias.double().cpu(), padding=1,
                        groups=groups)  # fmt: skip

    x1 = torch.randn(2, 1, 16, 16, 16, device="cuda")
    stem = SparseConv3d(1, 8, 3, padding=1).cuda()
    torch.testing.assert_close(stem(x1).double().cpu(), ref(x1, stem), rtol=1e-4, atol=1e-4)
    x = torch.randn(2, 16, 16, 16, 16, device="cuda")
    dw = SparseConv3d(16, 16, 3, padding=1, groups=16).cuda()
    mask = (torch.rand(2, 1, 16, 16, 16, device="cuda") > 0.5).float()
    expected = ref(x, dw, groups=16) * mask.double().cpu()
    torch.testing.assert_close(dw(x, mask).double().cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs triton; on GPUs the CUDA tests cover it")
def test_interpreter_parity():
    """The Triton kernels under TRITON_INTERPRET=1 on CPU tensors (a subprocess: the flag is read at import)."""
    run_interpreter_check(__file__)


def _interpreter_check() -> None:
    from mambamim.ops import depthwise_conv3d_triton as dwt

    for c, shape, k in [(5, (3, 4, 5), 3), (70, (2, 2, 3), 1)]:
        x, w, bias, gy = _depthwise_case(2, c, shape, k, "cpu", torch.float32, seed=1)
        y = dwt._launch_forward(x, dwt._taps_by_channel(w), bias, k)
        gx, gw, gb = dwt._launch_backward(gy, x, w, k)
        ry, rgx, rgw, rgb = _reference64(x, w, bias, gy)
        errs = [_rel(a, r) for a, r in ((y, ry), (gx, rgx), (gw, rgw), (gb, rgb))]
        print("interpreter", c, shape, k, errs)
        assert max(errs) < 1e-5, errs
    # The registered op with its autograd formula (custom-op rules: no aliased outputs, fake kernels
    # that match), eager and under torch.compile(fullgraph=True).
    x, w, bias, gy = _depthwise_case(2, 6, (3, 4, 5), 3, "cpu", torch.float32, seed=2)
    ry, rgx, rgw, rgb = _reference64(x, w, bias, gy)
    for fn in (dwt.depthwise_conv3d_triton, torch.compile(dwt.depthwise_conv3d_triton, fullgraph=True)):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, bias)]
        y = fn(*leaves)
        y.backward(gy)
        errs = [_rel(a, r) for a, r in ((y.detach(), ry), (leaves[0].grad, rgx), (leaves[1].grad, rgw),
                                        (leaves[2].grad, rgb))]  # fmt: skip
        print("interpreter op", errs)
        assert max(errs) < 1e-5, errs
    # Schema, fake kernels (strides included), autograd registration; channels-last x and weight
    # as a channels-last model has them.
    cl = torch.channels_last_3d
    for args in ((x, w, bias), (x.contiguous(memory_format=cl), w.contiguous(memory_format=cl), None)):
        args = tuple(t.clone().requires_grad_(True) if t is not None else None for t in args)
        torch.library.opcheck(torch.ops.mambamim.depthwise_conv3d.default, args)
    print("INTERPRETER OK")


if __name__ == "__main__" and "--interpreter-check" in sys.argv:
    _interpreter_check()
