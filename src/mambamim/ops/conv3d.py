"""Fast paths for two 3D convolutions that cuDNN / ATen run slowly on GPUs.

- :func:`depthwise_conv3d`: MedNeXt's depthwise k^3 convolution. On CUDA (with Triton) it runs the
  fused kernels of :mod:`mambamim.ops.depthwise_conv3d_triton`; elsewhere, and as the parity
  reference, ``F.conv3d(..., groups=C)``.
- :func:`im2col_conv3d`: a stride-1 convolution with very few input channels (the 1-channel stem).
  cuDNN reaches about 3 TFLOP/s there; gathering the k^3 shifted copies (k^3 * C_in channels) and
  multiplying by the weight matrix is a plain GEMM instead.

Both are exact re-formulations (same weights, same result up to float rounding).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["conv3d_same", "conv3d_valid", "depthwise_conv3d", "depthwise_conv3d_ref", "im2col_conv3d", "use_fast_depthwise",
           "triton_disabled"]

# im2col pays while the gathered copies stay narrow: C_in * k^3 <= this (the 1-channel 3^3 stem: 27).
IM2COL_MAX_INPUTS = 32


def depthwise_conv3d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch depthwise convolution (stride 1, padding k // 2)."""
    return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def triton_disabled(name: str) -> bool:
    """True when the environment variable ``MAMBAMIM_DISABLE_TRITON`` lists ``name`` (comma-separated:
    ``dwconv``, ``scan``, ``blocks``, ``toki``) or says ``all``: an escape hatch back to the PyTorch paths."""
    names = {n.strip() for n in os.environ.get("MAMBAMIM_DISABLE_TRITON", "").split(",")}
    return name in names or "all" in names


def use_fast_depthwise(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where the Triton kernels apply: CUDA tensors, Triton present, k in (1, 3)."""
    if not x.is_cuda or triton_disabled("dwconv"):
        return False
    try:
        from mambamim.ops import depthwise_conv3d_triton as dwt
    except ImportError:
        return False
    return dwt.is_available() and weight.shape[-1] in dwt.SUPPORTED_KERNELS


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for x's device type (CUDA only; CPU runs the reference)."""
    if x.device.type != "cuda":
        return None
    try:  # torch >= 2.4
        on, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except TypeError:  # pragma: no cover - older torch
        on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if on else None


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise 3D convolution, stride 1, "same" padding.

    Args:
        x: (B, C, D, H, W).
        weight: (C, 1, k, k, k), k odd.
        bias: optional (C,).
    Returns:
        (B, C, D, H, W). On CUDA the Triton path accumulates in fp32 and returns x's dtype (the autocast
        dtype under autocast, as ``F.conv3d`` would), channels-last 3D; weights stay fp32.
    """
    if x.dim() != 5 or weight.dim() != 5 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv3d: need x (B, C, D, H, W) and weight (C, 1, k, k, k), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")  # fmt: skip
    if weight.shape[-1] % 2 != 1 or len(set(weight.shape[2:])) != 1:
        raise ValueError(f"depthwise_conv3d: kernel must be cubic with an odd side, got {tuple(weight.shape[2:])}")
    if use_fast_depthwise(x, weight):
        from mambamim.ops.depthwise_conv3d_triton import depthwise_conv3d_triton

        dtype = _autocast_dtype(x)
        if dtype is not None and x.dtype == torch.float32:
            x = x.to(dtype)
        return depthwise_conv3d_triton(x, weight, bias)
    return depthwise_conv3d_ref(x, weight, bias)


def im2col_conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, padding: Optional[int] = None
) -> torch.Tensor:
    """Stride-1 dense convolution as one GEMM over the k^3 shifted copies of x.

    Worth it only for few input channels (memory grows with k^3 * C_in). (B, Cin, D, H, W) ->
    (B, Cout, D', H', W') with D' = D + 2 padding - k + 1, channels-last 3D; weight (Cout, Cin, k, k, k),
    k odd; padding None is "same" (k // 2), 0 is "valid".
    """
    cout, cin, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    if x.dim() != 5 or x.shape[1] != cin or weight.shape[2:] != (k, k, k) or k % 2 != 1:
        raise ValueError(f"im2col_conv3d: need x (B, {cin}, D, H, W) and a cubic odd kernel, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")  # fmt: skip
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    p = k // 2 if padding is None else int(padding)
    xp = F.pad(x, (p, p) * 3) if p else x
    B, D, H, W = xp.shape[0], *(s - k + 1 for s in xp.shape[2:])
    if min(D, H, W) < 1:
        raise ValueError(f"im2col_conv3d: input {tuple(x.shape)} is smaller than the {k}^3 kernel")
    # (B, D, H, W, Cin * k^3), in the (cin, kd, kh, kw) order of weight.reshape(cout, -1). One strided
    # copy of an unfolded view: a stack of the k^3 shifted slices became k^3 separate kernels under
    # Inductor, each writing every k^3-th element (5 ms for the stem on an H100, batch 8 at 96^3).
    cols = xp.unfold(2, k, 1).unfold(3, k, 1).unfold(4, k, 1)  # (B, Cin, D, H, W, k, k, k)
    cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(B, D, H, W, cin * k**3)
    y = F.linear(cols, weight.reshape(cout, -1), bias)  # (B, D, H, W, Cout)
    return y.permute(0, 4, 1, 2, 3)  # a channels-last 3D view


def _use_im2col(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    # CUDA only: cuDNN is slow with few input channels (2.6 TFLOP/s for the 1-channel stem on an H100)
    return x.is_cuda and groups == 1 and weight.shape[1] * weight.shape[-1] ** 3 <= IM2COL_MAX_INPUTS


def conv3d_same(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, groups: int = 1
) -> torch.Tensor:
    """Stride-1 convolution with "same" zero padding and a cubic odd kernel, through the fastest exact path
    for x's device: on CUDA depthwise convolutions take :func:`depthwise_conv3d` and ones with few inputs per
    output (C_in * k^3 <= ``IM2COL_MAX_INPUTS``) :func:`im2col_conv3d`; everything else ``F.conv3d``."""
    k = weight.shape[-1]
    if x.is_cuda and groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1:
        return depthwise_conv3d(x, weight, bias)
    if _use_im2col(x, weight, groups):
        return im2col_conv3d(x, weight, bias)
    return F.conv3d(x, weight, bias, padding=k // 2, groups=groups)


def conv3d_valid(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, groups: int = 1
) -> torch.Tensor:
    """Stride-1 convolution without padding (each side shrinks by k - 1), for blocks that carry their own
    context; few inputs per output take :func:`im2col_conv3d` on CUDA, as in :func:`conv3d_same`."""
    if _use_im2col(x, weight, groups):
        return im2col_conv3d(x, weight, bias, padding=0)
    return F.conv3d(x, weight, bias, groups=groups)
