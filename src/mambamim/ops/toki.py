"""TOKI: selective-structured-state-space token interpolation (paper section 3.4, Eq. 8; SPEC 2.5).

The bottleneck tokens are a sequence in scan order of which only the visible ones went
through the Mamba encoder. TOKI refills every run of ``Q`` masked tokens lying between two
visible outputs ``y_left`` and ``y_right``::

    s_n = ((Q + 2 - n) * y_left + n * y_right) / (Q + 2),    n = 0 .. Q+1
    z_0 = y_left
    z_n = A z_{n-1} + s_n,                                   n = 1 .. Q
    masked token n <- z_n

i.e. ``z_n = sum_{k=0..n} A^(n-k) s_k`` (B' = C' = I as the paper simplifies). A run at the
start or end of the sequence uses a learnable edge token in place of its missing visible
neighbour.

Convention: tokens are row vectors of channels, so ``A z`` (A acting on the channel column
vector) is written ``z @ A.T`` here. With ``A = 0`` TOKI is plain linear interpolation.

Implementation: the recurrence is a first-order linear scan with a constant matrix, reset at
every visible token. It is evaluated with a Hillis-Steele doubling scan over the whole padded
sequence: ``ceil(log2(L + 2))`` steps, each one ``(B * (L + 2), C) x (C, C)`` matmul with
``A^(2^j)`` (by repeated squaring). There is no Python loop over samples or runs and no
data-dependent shape or host sync, so it works under ``torch.compile`` and CUDA graphs, on any
device. The recurrence runs in float32 (float64 stays float64) with autocast disabled; the
filled tokens are cast back to the dtype of ``tokens``.

On CUDA, a call that needs no gradient (inference, the no-grad previews) runs the same scan in Triton
(:mod:`mambamim.ops.toki_triton`: one persistent launch instead of about 65, which skips the doubling
steps past the longest masked run).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mambamim.ops import toki_triton
from mambamim.ops.conv3d import triton_disabled

__all__ = [
    "toki_fill",
    "TOKI",
    "LearnableMaskToken",
]


def _check_inputs(tokens: Tensor, visible: Tensor) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (batch, length, channels), got shape {tuple(tokens.shape)}")
    if visible.dtype != torch.bool:
        raise ValueError(f"visible must be a bool tensor, got {visible.dtype}")
    if tuple(visible.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"visible must be (batch, length) = {tuple(tokens.shape[:2])}, got {tuple(visible.shape)}"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def toki_fill(tokens: Tensor, visible: Tensor, A: Tensor, edge_token: Tensor) -> Tensor:
    """Fill the masked tokens of a scan-ordered sequence by TOKI (Eq. 8).

    Args:
        tokens: ``(B, L, C)`` in scan order. Values at masked positions are ignored entirely
            (even NaN/inf there reaches neither the output nor any gradient).
        visible: ``(B, L)`` bool, True = visible (encoder output present).
        A: ``(C, C)`` state matrix A'; ``z_n = z_{n-1} @ A.T + s_n``.
        edge_token: ``(C,)`` stands in for the missing visible neighbour of a run of masked
            tokens at the start or end of the sequence.

    Returns:
        ``(B, L, C)`` in the dtype of ``tokens``: visible tokens unchanged (bit-exact), masked
        tokens filled. A sample with no visible token at all is filled from the edge token at
        both ends.
    """
    _check_inputs(tokens, visible)
    B, L, C = tokens.shape
    if tuple(A.shape) != (C, C):
        raise ValueError(f"A must be ({C}, {C}), got {tuple(A.shape)}")
    if tuple(edge_token.shape) != (C,):
        raise ValueError(f"edge_token must be ({C},), got {tuple(edge_token.shape)}")

    if _use_triton(tokens, visible, A, edge_token):
        return toki_triton.toki_fill_triton(tokens, visible, A, edge_token)
    return _toki_fill_torch(tokens, visible, A, edge_token)


def _use_triton(tokens: Tensor, visible: Tensor, A: Tensor, edge_token: Tensor) -> bool:
    """The Triton forward where no gradient is asked for, outside torch.compile (whose graph fuses this
    module's version), on CUDA with every input on the tokens' device (else the PyTorch version, which
    reports a mixed-device call); ``MAMBAMIM_DISABLE_TRITON=toki`` turns it off."""
    if torch.compiler.is_compiling():  # first: under Dynamo nothing below gets traced
        return False
    same_device = all(t.device == tokens.device for t in (visible, A, edge_token))
    if not (toki_triton.supports(tokens) and same_device) or triton_disabled("toki"):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (tokens, A, edge_token)))


def _toki_fill_torch(tokens: Tensor, visible: Tensor, A: Tensor, edge_token: Tensor) -> Tensor:
    """toki_fill in PyTorch ops (differentiable; any device): the doubling scan described above."""
    B, L, C = tokens.shape
    cdt = _compute_dtype(tokens.dtype)
    device = tokens.device
    T = L + 2
    with torch.autocast(device_type=device.type, enabled=False):
        # Zero the masked values first so that nothing (NaN included) can leak from them.
        x = tokens.to(cdt).masked_fill(~visible.unsqueeze(-1), 0.0)
        edge = edge_token.to(device=device, dtype=cdt).expand(B, 1, C)
        x = torch.cat([edge, x, edge], dim=1)  # (B, T, C); the edges count as visible
        ones = torch.ones(B, 1, dtype=torch.bool, device=device)
        vis = torch.cat([ones, visible, ones], dim=1)  # (B, T)

        idx = torch.arange(T, device=device).expand(B, T)
        prev = torch.where(vis, idx, torch.zeros_like(idx)).cummax(dim=1).values
        big = torch.full_like(idx, T - 1)
        nxt = torch.where(vis, idx, big).flip(1).cummin(dim=1).values.flip(1)

        # At a visible position prev == nxt == t, so n = 0 and Q + 2 = 1: s = y_left = token.
        n = (idx - prev).to(cdt).unsqueeze(-1)
        q2 = (nxt - prev + 1).to(cdt).unsqueeze(-1)  # Q + 2
        y_left = x.gather(1, prev.unsqueeze(-1).expand(B, T, C))
        y_right = x.gather(1, nxt.unsqueeze(-1).expand(B, T, C))
        z = ((q2 - n) * y_left + n * y_right) / q2  # w_t: s_n at masked, the token at visible

        # t - d lies in t's segment (its visible token + the run after it) iff n_t >= d; n_t <= t, so
        # the gate is 0 wherever roll() wraps around. z is finite, so a 0/1 product is safe.
        steps = max(1, math.ceil(math.log2(T)))
        shifts = torch.pow(2.0, torch.arange(steps, device=device, dtype=cdt))  # no host-to-device copy
        gates = (n >= shifts).to(cdt)  # (B, T, steps)
        power = A.to(device=device, dtype=cdt)
        for j in range(steps):
            if j > 0:
                power = power @ power  # A^(2^j)
            carry = torch.roll(z @ power.T, shifts=1 << j, dims=1)  # carry[t] = A^(2^j) z[t - 2^j]
            z = torch.addcmul(z, gates[..., j : j + 1], carry)

        filled = z[:, 1:-1].to(tokens.dtype)
    return torch.where(visible.unsqueeze(-1), tokens, filled)



def _token_parameter(dim: int, std: float, std_name: str) -> nn.Parameter:
    """A learnable (dim,) token, truncated-normal (std, cut at 2 std) or zero when std is 0."""
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if std < 0:
        raise ValueError(f"{std_name} must be >= 0, got {std}")
    token = nn.Parameter(torch.zeros(dim))
    if std > 0:
        nn.init.trunc_normal_(token, std=std, a=-2 * std, b=2 * std)
    return token

class TOKI(nn.Module):
    """TOKI mask-token generator with a learnable state matrix A' and edge token.

    Args:
        dim: channel count C.
        edge_init_std: std of the truncated-normal init of the edge token.

    ``A`` starts at zero so TOKI begins as linear interpolation between visible tokens.
    """

    def __init__(self, dim: int, edge_init_std: float = 0.02) -> None:
        super().__init__()
        token = _token_parameter(dim, edge_init_std, "edge_init_std")
        self.dim = dim
        self.A = nn.Parameter(torch.zeros(dim, dim))  # registered first: the optimiser's parameter order
        self.edge_token = token

    def forward(self, tokens: Tensor, visible: Tensor) -> Tensor:
        """tokens ``(B, L, C)`` scan order, visible ``(B, L)`` bool -> ``(B, L, C)`` filled."""
        return toki_fill(tokens, visible, self.A, self.edge_token)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LearnableMaskToken(nn.Module):
    """Ablation "learnable": every masked token becomes one shared learnable vector.

    Same forward signature as :class:`TOKI`.
    """

    def __init__(self, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.dim = dim
        self.mask_token = _token_parameter(dim, init_std, "init_std")

    def forward(self, tokens: Tensor, visible: Tensor) -> Tensor:
        """tokens ``(B, L, C)``, visible ``(B, L)`` bool -> ``(B, L, C)``; masked -> mask_token."""
        _check_inputs(tokens, visible)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens have {tokens.shape[-1]} channels, expected {self.dim}")
        fill = self.mask_token.to(tokens.dtype).expand_as(tokens)
        return torch.where(visible.unsqueeze(-1), tokens, fill)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
