"""Selective scan (the S6 core of Mamba): one public op, a plain-PyTorch path and a fused GPU path.

    delta <- softplus(delta + delta_bias)            (bias and softplus when asked)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <C_t, h_t> + D * u_t,   then y_t *= silu(z_t) when z is given

Layouts: u, delta, z: (batch, dim, length); A: (dim, state); B, C: (batch, state, length);
D, delta_bias: (dim,). Returns y: (batch, dim, length) in u's dtype.

The PyTorch path never loops over time step by step. The linear recurrence h_t = a_t h_{t-1} + b_t is
solved by a two-level scan: a Hillis-Steele doubling scan inside chunks of ``_CHUNK`` steps, then a
recursive scan over the chunk carries. Only products of the decays a_t = exp(delta_t A) in (0, 1]
appear, so nothing overflows however long the sequence is (unlike cumulative-log formulations, which
need exp(+sum delta A)). The recurrence has a hand-written backward (a reverse scan for the adjoint
state), so autograd does not keep the log2(chunk) intermediate levels.
"""

from __future__ import annotations

import logging

from typing import Any

import torch
import torch.nn.functional as F

from mambamim.ops.scan_shapes import check_scan_shapes as _check_shapes

logger = logging.getLogger(__name__)

_CHUNK = 64

__all__ = ["selective_scan", "selective_scan_ref", "linear_scan"]


def _scan_chunked(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t h_{t-1} + b_t along the last dim.

    Returns (P, h) where P_t = prod_{k<=t} a_k (needed by the caller to propagate carries) and h_t.
    """
    length = a.shape[-1]
    if length <= _CHUNK:
        step = 1
        while step < length:
            # Out of place: every position reads the previous level's values.
            b = torch.cat([b[..., :step], b[..., step:] + a[..., step:] * b[..., :-step]], dim=-1)
            a = torch.cat([a[..., :step], a[..., step:] * a[..., :-step]], dim=-1)
            step *= 2
        return a, b
    pad = (-length) % _CHUNK
    if pad:
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad), value=0.0)
    lead = a.shape[:-1]
    n_chunks = a.shape[-1] // _CHUNK
    a_loc, h_loc = _scan_chunked(a.reshape(*lead, n_chunks, _CHUNK), b.reshape(*lead, n_chunks, _CHUNK))
    # State at the end of each chunk, then the state entering each chunk.
    p_tot, carry = _scan_chunked(a_loc[..., -1], h_loc[..., -1])
    carry_in = F.pad(carry[..., :-1], (1, 0), value=0.0)
    p_in = F.pad(p_tot[..., :-1], (1, 0), value=1.0)
    h = h_loc + a_loc * carry_in.unsqueeze(-1)
    p = a_loc * p_in.unsqueeze(-1)
    h = h.reshape(*lead, n_chunks * _CHUNK)[..., :length]
    p = p.reshape(*lead, n_chunks * _CHUNK)[..., :length]
    return p, h


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _, h = _scan_chunked(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        a, h = ctx.saved_tensors
        # Adjoint: lam_t = g_t + a_{t+1} lam_{t+1}, a reverse scan with the decays shifted by one.
        a_next = F.pad(a[..., 1:], (0, 1), value=0.0)
        _, lam = _scan_chunked(a_next.flip(-1), grad_h.flip(-1))
        lam = lam.flip(-1)
        h_prev = F.pad(h[..., :-1], (1, 0), value=0.0)
        return lam * h_prev, lam


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along the last dim, elementwise over leading dims.

    Args:
        a: decays, any shape (..., L); values in [0, 1] keep the scan bounded.
        b: inputs, same shape as ``a``.
    Returns:
        h, same shape.
    """
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a {tuple(a.shape)} and b {tuple(b.shape)} differ in shape")
    return _LinearScan.apply(a, b)


def _reference_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                    delta_softplus: bool) -> torch.Tensor:
    """The plain-PyTorch scan (shapes already checked); computes in float32, float64 stays float64."""
    out_dtype = u.dtype
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # (batch, dim, state, length)
    a = torch.exp(delta.unsqueeze(2) * A[None, :, :, None])
    b = (delta * u).unsqueeze(2) * B.unsqueeze(1)
    h = linear_scan(a, b)
    y = torch.einsum("bdnl,bnl->bdl", h, C)
    if D is not None:
        y = y + D.to(ct)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(out_dtype)


def selective_scan_ref(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Plain-PyTorch selective scan on any device, computing in float32 (float64 stays float64): the
    reference the fast kernel's parity tests compare with. The arguments of :func:`selective_scan`."""
    return selective_scan(*args, backend="reference", **kwargs)


def _selective_scan_fused(*args):
    # A registered custom op (torch >= 2.4): torch.compile keeps it as one opaque call, no graph break.
    from mambamim.ops.selective_scan_triton import _USE_CUSTOM_OP, selective_scan_triton

    if _USE_CUSTOM_OP:
        return selective_scan_triton(*args)
    return _selective_scan_compiler_disabled(*args)


@torch.compiler.disable
def _selective_scan_compiler_disabled(*args):
    # Older torch: the Triton autograd.Function runs as an opaque call (a graph break).
    from mambamim.ops.selective_scan_triton import selective_scan_triton

    return selective_scan_triton(*args)


def _use_fast_path(u: torch.Tensor) -> bool:
    from mambamim.ops.conv3d import triton_disabled

    if not u.is_cuda or triton_disabled("scan"):
        return False
    try:
        from mambamim.ops import selective_scan_triton
    except ImportError:
        return False
    return selective_scan_triton.is_available()


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Selective scan with a fused Triton kernel on CUDA (when Triton is there) and PyTorch elsewhere.

    Args:
        u: (batch, dim, length) input.
        delta: (batch, dim, length) time steps (before bias / softplus).
        A: (dim, state) state matrix (negative for a stable scan).
        B, C: (batch, state, length) input and output projections.
        D: optional (dim,) skip.
        z: optional (batch, dim, length) gate; y *= silu(z).
        delta_bias: optional (dim,) added to delta.
        delta_softplus: apply softplus to delta (after the bias).
        backend: ``"auto"`` (the fast kernel where it runs) or ``"reference"`` (plain PyTorch everywhere).
    Returns:
        y: (batch, dim, length) in u's dtype; state and accumulation are float32.
    """
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend must be 'auto' or 'reference', got {backend!r}")
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if backend == "auto" and _use_fast_path(u):
        return _selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _reference_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
