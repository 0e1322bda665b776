"""Fused Triton kernels for the depthwise 3D convolution (stride 1, "same" padding, k = 1 or 3).

PyTorch runs 3D depthwise convolutions on CUDA through a generic direct kernel that reaches about
1 TFLOP/s (13 ms for the forward and backward of MedNeXt's 64-channel 48^3 layer at batch 8 on an
H100, where moving the data once takes about 1 ms). These kernels work on channels-last 3D tensors:

- forward: a program owns a (TH x TW) tile of one depth slice for a block of channels and
  accumulates the k^3 shifted loads in fp32 (neighbouring loads hit L1);
- input gradient: the forward kernel with the spatially flipped kernel;
- weight and bias gradient: a program reduces x_shifted * dy over its tile for every tap and writes
  one (taps + 1, channels) fp32 partial; the partials are summed by ``torch.sum`` (no atomics,
  deterministic).

The op is registered as ``torch.ops.mambamim.depthwise_conv3d`` (a custom op with its own autograd
formula), so torch.compile treats it as one opaque call without a graph break.
Use :func:`mambamim.ops.conv3d.depthwise_conv3d`, which falls back to ``F.conv3d`` elsewhere.
"""

from __future__ import annotations

from typing import Optional

import torch

from mambamim.ops._triton import HAS_TRITON as _HAS_TRITON
from mambamim.ops._triton import is_available, tl, triton

__all__ = ["depthwise_conv3d_triton", "is_available", "SUPPORTED_KERNELS"]

SUPPORTED_KERNELS = (1, 3)  # k = 5 would unroll 125 taps per kernel
_CL = torch.channels_last_3d


if _HAS_TRITON:

    # This program's tile: sample b, depth slice d, the (TH x TW) rows h / columns w, the block of
    # channels c and its bounds mask cm. Grid: (B * D * nTH * nTW, cdiv(C, BC)).
    @triton.jit
    def _tile(D, C, nTH, nTW, TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr):
        pid_s = tl.program_id(0)
        tw_i = pid_s % nTW
        t = pid_s // nTW
        th_i = t % nTH
        t = t // nTH
        offs = tl.arange(0, TH * TW)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        return t // D, t % D, th_i * TH + offs // TW, tw_i * TW + offs % TW, c, c < C

    # x at depth dd, rows hh, columns ww (the tile shifted by one kernel tap) as fp32; zero outside
    # the volume (the "same" padding) and where `valid` is false.
    @triton.jit
    def _load_shifted(x_ptr, b, dd, hh, ww, c, cm, D, H, W, C, valid):
        # Depth bounds as a vector: the interpreter mishandles scalar & vector boolean masks.
        dd = hh * 0 + dd
        ok = (dd >= 0) & (dd < D) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W) & valid
        row = (((b * D + dd) * H + hh) * W + ww).to(tl.int64)
        return tl.load(x_ptr + row[:, None] * C + c[None, :], mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32)

    # One build per tile shape and dtype, not per volume size: D, H, W and the tile counts are not
    # specialised (C stays specialised: its divisibility by 16 lets the channel loads vectorise).
    @triton.jit(do_not_specialize=["D", "H", "W", "nTH", "nTW"])
    def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, D, H, W, C, nTH, nTW,
                       K: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
                       HAS_BIAS: tl.constexpr):  # fmt: skip
        b, d, h, w, c, cm = _tile(D, C, nTH, nTW, TH, TW, BC)
        in_tile = (h < H) & (w < W)
        P: tl.constexpr = K // 2
        acc = tl.zeros([TH * TW, BC], dtype=tl.float32)
        for kd in tl.static_range(K):
            for kh in tl.static_range(K):
                for kw in tl.static_range(K):
                    xv = _load_shifted(x_ptr, b, d + kd - P, h + kh - P, w + kw - P, c, cm, D, H, W, C, in_tile)
                    wv = tl.load(w_ptr + ((kd * K + kh) * K + kw) * C + c, mask=cm, other=0.0)
                    acc += xv * wv[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=cm, other=0.0)[None, :]
        row = (((b * D + d) * H + h) * W + w).to(tl.int64)
        tl.store(y_ptr + row[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=in_tile[:, None] & cm[None, :])

    @triton.jit(do_not_specialize=["D", "H", "W", "nTH", "nTW"])
    def _dw_bwd_w_kernel(x_ptr, gy_ptr, part_ptr, D, H, W, C, nTH, nTW,
                         K: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr):  # fmt: skip
        # Same tiling as the forward; every program writes its own (taps + 1, BC) partial sums
        # (row k^3: the bias gradient), reduced afterwards by torch.sum.
        b, d, h, w, c, cm = _tile(D, C, nTH, nTW, TH, TW, BC)
        in_tile = (h < H) & (w < W)
        P: tl.constexpr = K // 2
        KK: tl.constexpr = K * K * K
        row = (((b * D + d) * H + h) * W + w).to(tl.int64)
        gy = tl.load(gy_ptr + row[:, None] * C + c[None, :], mask=in_tile[:, None] & cm[None, :], other=0.0)
        gy = gy.to(tl.float32)
        out = part_ptr + tl.program_id(0).to(tl.int64) * (KK + 1) * C + c
        tl.store(out + KK * C, tl.sum(gy, axis=0), mask=cm)
        for kd in tl.static_range(K):
            for kh in tl.static_range(K):
                for kw in tl.static_range(K):
                    xv = _load_shifted(x_ptr, b, d + kd - P, h + kh - P, w + kw - P, c, cm, D, H, W, C, in_tile)
                    tl.store(out + ((kd * K + kh) * K + kw) * C, tl.sum(xv * gy, axis=0), mask=cm)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tiles(H: int, W: int, C: int) -> tuple[int, int, int]:
    """(TH, TW, BC): about 64 positions x up to 64 channels per program."""
    tw = min(16, _pow2(W))
    th = max(1, min(64 // tw, _pow2(H)))
    bc = min(64, _pow2(C))
    return th, tw, bc


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> int:
    if x.dim() != 5:
        raise ValueError(f"depthwise_conv3d: x must be (B, C, D, H, W), got {tuple(x.shape)}")
    c = x.shape[1]
    k = weight.shape[-1]
    if tuple(weight.shape) != (c, 1, k, k, k) or k not in SUPPORTED_KERNELS:
        raise ValueError(f"depthwise_conv3d: weight must be ({c}, 1, k, k, k) with k in {SUPPORTED_KERNELS}, "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"depthwise_conv3d: bias must be ({c},), got {tuple(bias.shape)}")
    return k


def _taps_by_channel(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(C, 1, k, k, k) -> (k^3, C) fp32, optionally flipped in space (for the input gradient)."""
    if flip:
        weight = weight.flip(2, 3, 4)
    return weight.reshape(weight.shape[0], -1).t().contiguous().float()


def _launch_forward(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], k: int) -> torch.Tensor:
    B, C, D, H, W = x.shape
    x = x.contiguous(memory_format=_CL)
    y = torch.empty_like(x, memory_format=_CL)
    if x.numel() == 0:
        return y
    th, tw, bc = _tiles(H, W, C)
    n_th, n_tw = triton.cdiv(H, th), triton.cdiv(W, tw)
    grid = (B * D * n_th * n_tw, triton.cdiv(C, bc))
    b = bias.float().contiguous() if bias is not None else taps  # dummy pointer when there is no bias
    _dw_fwd_kernel[grid](x, taps, b, y, D, H, W, C, n_th, n_tw, K=k, TH=th, TW=tw, BC=bc,
                         HAS_BIAS=bias is not None, num_warps=4)  # fmt: skip
    return y


def _launch_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, k: int,
                     need_input_grad: bool = True) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:  # fmt: skip
    B, C, D, H, W = x.shape
    gy = gy.contiguous(memory_format=_CL)
    x = x.contiguous(memory_format=_CL)
    gx = _launch_forward(gy, _taps_by_channel(weight, flip=True), None, k).to(x.dtype) if need_input_grad else None
    th, tw, bc = _tiles(H, W, C)
    n_th, n_tw = triton.cdiv(H, th), triton.cdiv(W, tw)
    kk = k**3
    n_s = B * D * n_th * n_tw
    part = torch.empty(n_s, kk + 1, C, device=x.device, dtype=torch.float32)
    _dw_bwd_w_kernel[(n_s, triton.cdiv(C, bc))](x, gy, part, D, H, W, C, n_th, n_tw, K=k, TH=th, TW=tw, BC=bc,
                                                num_warps=4)  # fmt: skip
    total = part.sum(0)
    # Fresh tensors laid out like the weight (what the fake kernel promises, and what DDP's gradient
    # buckets expect): a custom op's outputs may not alias each other, and views of `total` would.
    gw = torch.empty_like(weight)
    gw.copy_(total[:kk].t().reshape(C, 1, k, k, k))
    gb = total[kk].clone()
    return gx, gw, gb


if _HAS_TRITON and hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("mambamim::depthwise_conv3d", mutates_args=())
    def _dw_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return _launch_forward(x, _taps_by_channel(weight), bias, weight.shape[-1])

    @_dw_op.register_fake
    def _(x, weight, bias):
        return torch.empty_like(x, memory_format=_CL)

    @torch.library.custom_op("mambamim::depthwise_conv3d_backward", mutates_args=())
    def _dw_bwd_op(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch_backward(gy, x, weight, weight.shape[-1])

    @_dw_bwd_op.register_fake
    def _(gy, x, weight):
        return (torch.empty_like(x, memory_format=_CL), torch.empty_like(weight),
                weight.new_empty((weight.shape[0],), dtype=torch.float32))  # fmt: skip

    def _setup(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def _backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx, gw, gb = _dw_bwd_op(gy, x, weight)
        return gx, gw, (gb.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None)

    torch.library.register_autograd("mambamim::depthwise_conv3d", _backward, setup_context=_setup)

    def _apply(x, weight, bias):
        return _dw_op(x, weight, bias)

elif _HAS_TRITON:  # torch < 2.4: no custom_op; an autograd.Function behind a compiler boundary

    class _DepthwiseFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            return _launch_forward(x, _taps_by_channel(weight), bias, weight.shape[-1])

        @staticmethod
        def backward(ctx, gy):
            x, weight = ctx.saved_tensors
            gx, gw, gb = _launch_backward(gy, x, weight, weight.shape[-1], ctx.needs_input_grad[0])
            return gx, gw, (gb if ctx.has_bias else None)

    def _apply(x, weight, bias):
        return _DepthwiseFn.apply(x, weight, bias)


def depthwise_conv3d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise 3D convolution, stride 1, padding k // 2; differentiable in x, weight and bias.

    Args:
        x: (B, C, D, H, W), any float dtype (computed in fp32, returned in x's dtype, channels-last 3D).
        weight: (C, 1, k, k, k) with k in (1, 3).
        bias: optional (C,).
    """
    _check(x, weight, bias)
    if not _HAS_TRITON:
        raise RuntimeError("depthwise_conv3d_triton needs triton, which is not installed")
    return _apply(x, weight, bias)
