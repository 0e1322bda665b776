"""Bidirectional Mamba mixer (Vision Mamba "v2"), with the parameter names of the usual Mamba block.

Forward branch: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj. Backward branch (scans the
reversed sequence): conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b. Output:
``out_proj(y_forward + flip(y_backward))``. ``bidirectional=False`` keeps only the forward branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambamim.ops.selective_scan import selective_scan

__all__ = ["MambaMixer"]


class MambaMixer(nn.Module):
    """Selective-state-space token mixer.

    Args:
        d_model: token width C.
        d_state: SSM state size N (16).
        d_conv: causal depthwise conv width (4).
        expand: inner width factor (2): d_inner = expand * d_model.
        dt_rank: rank of the time-step projection; ``"auto"`` = ceil(d_model / 16).
        bidirectional: add the reversed-sequence branch (Vision Mamba v2).
        dt_min, dt_max, dt_init_floor: range of the initial time steps (as in Mamba).
        conv_bias, bias: biases of conv1d and of in_proj / out_proj.

    Shapes: forward(x (B, L, C)) -> (B, L, C).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        bidirectional: bool = True,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaMixer: {name} must be a positive int, got {value!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"MambaMixer: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bidirectional = bidirectional

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        suffixes = ("", "_b") if bidirectional else ("",)
        for sfx in suffixes:
            conv = nn.Conv1d(
                self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
            )
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            self._init_dt(dt_proj, dt_min, dt_max, dt_init_floor)
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            a_log = nn.Parameter(torch.log(A))
            d_skip = nn.Parameter(torch.ones(self.d_inner))
            a_log._no_weight_decay = True  # type: ignore[attr-defined]
            d_skip._no_weight_decay = True  # type: ignore[attr-defined]
            setattr(self, f"conv1d{sfx}", conv)
            setattr(self, f"x_proj{sfx}", x_proj)
            setattr(self, f"dt_proj{sfx}", dt_proj)
            # Parameter names as in Mamba / Vision Mamba: A_log, D, A_b_log, D_b.
            setattr(self, "A_log" if sfx == "" else "A_b_log", a_log)
            setattr(self, f"D{sfx}", d_skip)

    def _init_dt(self, dt_proj: nn.Linear, dt_min: float, dt_max: float, floor: float) -> None:
        std = self.dt_rank**-0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            # Inverse softplus, so that softplus(bias) = dt at initialisation.
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

    def _ssm(self, x: torch.Tensor, z: torch.Tensor, backward: bool) -> torch.Tensor:
        """x, z: (B, d_inner, L) -> y (B, d_inner, L)."""
        sfx = "_b" if backward else ""
        conv: nn.Conv1d = getattr(self, f"conv1d{sfx}")
        x_proj: nn.Linear = getattr(self, f"x_proj{sfx}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{sfx}")
        a_log = self.A_b_log if backward else self.A_log
        d_skip = self.D_b if backward else self.D
        length = x.shape[-1]
        x = F.silu(conv(x)[..., :length])
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # bias goes in as delta_bias
        f32 = torch.promote_types(a_log.dtype, torch.float32)  # at least float32; float64 stays float64
        A = -torch.exp(a_log.to(f32))
        return selective_scan(
            x,
            delta,
            A,
            b.transpose(1, 2),
            c.transpose(1, 2),
            D=d_skip.to(f32),
            z=z,
            delta_bias=dt_proj.bias.to(f32),
            delta_softplus=True,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"MambaMixer expects (B, L, {self.d_model}), got {tuple(hidden.shape)}")
        xz = self.in_proj(hidden).transpose(1, 2)
        x, z = xz.chunk(2, dim=1)
        y = self._ssm(x, z, backward=False)
        if self.bidirectional:
            y = y + self._ssm(x.flip(-1), z.flip(-1), backward=True).flip(-1)
        return self.out_proj(y.transpose(1, 2))
