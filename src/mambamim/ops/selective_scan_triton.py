"""Fused Triton selective scan (the S6 core of Mamba), forward and backward.

Semantics (shared B/C across channels, as in Mamba where B and C come from ``x_proj``)::

    delta = delta + delta_bias[:, None]            (if delta_bias is given)
    delta = softplus(delta)                        (if delta_softplus)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h: (batch, dim, state), h_{-1} = 0
    y_t = sum_n C_t[n] * h_t[..., n] + D * u_t
    y_t = y_t * silu(z_t)                          (if z is given)

Layouts: ``u, delta, z``: (batch, dim, length); ``A``: (dim, state); ``B, C``: (batch, state, length);
``D, delta_bias``: (dim,). Output ``y``: (batch, dim, length) in ``u``'s dtype.

Kernel design. One program per (batch, block of ``BLOCK_D`` channels) walks the sequence in chunks
of ``BLOCK_T`` steps. Inside a chunk the work is a 4-D register tile ``(BLOCK_T, NG, BLOCK_D, NL)``
with ``d_state = NG * NL``: Triton's default layout puts the last axes on lanes and warps, so the
time axis (axis 0) and the state groups (axis 1) live inside each thread. The time recurrence is a
``tl.associative_scan`` along axis 0 (sequential within a thread, no shuffles) and the sum over the
state needs only ``log2(NL)`` shuffle levels. The state is fp32; inputs of any float dtype are loaded
and promoted. ``exp`` runs once per (b, d, n, t) in both passes.

Backward: the forward stores the state at every chunk start, ``(batch, n_chunks, dim, state)`` fp32
(a ``d_state / BLOCK_T`` fraction of one fp32 ``(batch, dim, length)`` tensor). The backward walks
the chunks in reverse; for each it recomputes the states inside the chunk from the stored start
state, then runs a reverse scan for the adjoint ``g_t = dL/dh_t``::

    g_t = C_t * dy0_t + exp(delta_{t+1} A) * g_{t+1}

The coefficient of ``g_{t+1}`` belongs to step ``t+1``; the reverse scan carries the first
coefficient of each segment (``_bwd_combine``) so no shifted copy of ``exp(delta A)`` is needed.
``exp(delta_t A) * h_{t-1}`` is taken as ``h_t - x_t``. Gradients of the shared ``B``/``C`` are
per-program partial sums over the program's channels, summed over channel blocks with torch;
``A``, ``D`` and ``delta_bias`` gradients are accumulated in registers over time and summed over the
batch with torch (deterministic, no atomics).
"""

from __future__ import annotations

import logging
from typing import List, NamedTuple, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

from mambamim.ops._triton import HAS_TRITON as _HAS_TRITON
from mambamim.ops._triton import is_available, tl, triton
from mambamim.ops.scan_shapes import check_scan_shapes

__all__ = ["selective_scan_triton", "is_available", "ScanConfig"]

_LOG2E = 1.4426950408889634
_MAX_STATE = 64


if _HAS_TRITON:

    @triton.jit
    def _fwd_combine(a1, b1, a2, b2):
        # (a, b) is the map h -> a * h + b; (a1, b1) is earlier in time than (a2, b2).
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _bwd_combine(p1, al1, f1, p2, al2, f2):
        # Reverse scan: argument 1 is the later segment R, argument 2 the earlier segment E.
        # A segment [i..j] maps q = exp(delta_{j+1} A) g_{j+1} to g_i = al + p * q; f = exp(delta_i A)
        # is its first coefficient, which the segment before it needs.
        w = p2 * f1
        return w * p1, al2 + w * al1, f2

    @triton.jit
    def _softplus(x):
        # log(1 + exp(x)) without overflow; torch's threshold 20 gives x itself there too.
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _load_rows(ptr, row, offs_t, d_mask, c, L, BLOCK_T: tl.constexpr, VEC: tl.constexpr):
        # (BLOCK_T, BLOCK_D) tile of a (batch, dim, L) tensor at chunk c, raw dtype; zeros outside.
        # L % VEC == 0: comparing t // VEC keeps the mask constant over VEC steps (vector loads)
        t = c * BLOCK_T + offs_t
        m2 = ((t >= 0) & ((t // VEC) < (L // VEC)))[:, None] & d_mask[None, :]
        return tl.load(ptr + row[None, :] + t[:, None], mask=m2, other=0.0)

    @triton.jit
    def _load_bc(ptr, bc_base, n_tn, offs_t, c, L, BLOCK_T: tl.constexpr, VEC: tl.constexpr):
        # (BLOCK_T, NG, NL) tile of a (batch, N, L) tensor at chunk c, raw dtype; zeros outside
        t = c * BLOCK_T + offs_t
        t_mask = (t >= 0) & ((t // VEC) < (L // VEC))
        rows = tl.multiple_of(n_tn * L, [VEC, VEC, VEC])
        return tl.load(ptr + bc_base + rows + t[:, None, None], mask=t_mask[:, None, None], other=0.0)

    @triton.jit
    def _ss_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, states_ptr,
        dim, L, n_chunks, n_states,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr, SAVE_T: tl.constexpr,
        N: tl.constexpr, NG: tl.constexpr, NL: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, VEC: tl.constexpr,
    ):
        # STORE_STATES: states[b, k] = state before step k * SAVE_T, k < n_states (BLOCK_T % SAVE_T == 0)
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        offs_t = tl.arange(0, BLOCK_T)
        # state index n = g * NL + l, as (NG, 1, NL) and (1, NG, NL)
        n3 = tl.arange(0, NG)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]
        n_tn = tl.arange(0, NG)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]
        t4 = offs_t[:, None, None, None]

        A = tl.load(A_ptr + offs_d[None, :, None] * N + n3, mask=d_mask[None, :, None], other=0.0)
        A2 = A.to(tl.float32) * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)

        row = tl.multiple_of(pid_b * dim * L + offs_d.to(tl.int64) * L, VEC)  # (BLOCK_D,)
        bc_base = pid_b * N * L
        if STORE_STATES and SAVE_T != BLOCK_T:
            z_off = (pid_b * n_states * dim + offs_d[None, :, None]) * N + n3
            tl.store(states_ptr + z_off, tl.zeros((NG, BLOCK_D, NL), tl.float32), mask=d_mask[None, :, None])
        # built as a reduction of a 4-D tile so that the loop carries it in the tile's layout
        h = tl.sum(tl.zeros((1, NG, BLOCK_D, NL), dtype=tl.float32), axis=0)
        # chunk c's tiles are loaded during chunk c - 1 (register prefetch hides the load latency)
        u_n = _load_rows(u_ptr, row, offs_t, d_mask, 0, L, BLOCK_T, VEC)
        dt_n = _load_rows(delta_ptr, row, offs_t, d_mask, 0, L, BLOCK_T, VEC)
        B_n = _load_bc(B_ptr, bc_base, n_tn, offs_t, 0, L, BLOCK_T, VEC)
        C_n = _load_bc(C_ptr, bc_base, n_tn, offs_t, 0, L, BLOCK_T, VEC)
        if HAS_Z:
            z_n = _load_rows(z_ptr, row, offs_t, d_mask, 0, L, BLOCK_T, VEC)
        for c in range(0, n_chunks):
            u = u_n.to(tl.float32)
            dt = dt_n.to(tl.float32)
            Bt = B_n.to(tl.float32)
            Ct = C_n.to(tl.float32)
            if HAS_Z:
                zz = z_n.to(tl.float32)
            u_n = _load_rows(u_ptr, row, offs_t, d_mask, c + 1, L, BLOCK_T, VEC)
            dt_n = _load_rows(delta_ptr, row, offs_t, d_mask, c + 1, L, BLOCK_T, VEC)
            B_n = _load_bc(B_ptr, bc_base, n_tn, offs_t, c + 1, L, BLOCK_T, VEC)
            C_n = _load_bc(C_ptr, bc_base, n_tn, offs_t, c + 1, L, BLOCK_T, VEC)
            if HAS_Z:
                z_n = _load_rows(z_ptr, row, offs_t, d_mask, c + 1, L, BLOCK_T, VEC)
            t = c * BLOCK_T + offs_t
            t_mask = t < L
            m2 = t_mask[:, None] & d_mask[None, :]
            off2 = row[None, :] + t[:, None]  # (BLOCK_T, BLOCK_D)
            if HAS_BIAS:
                dt = dt + bias[None, :]
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(m2, dt, 0.0)  # padded steps: exp(0) = 1 and no input, the state carries
            if STORE_STATES and SAVE_T == BLOCK_T:
                st_off = ((pid_b * n_states + c) * dim + offs_d[None, :, None]) * N + n3
                tl.store(states_ptr + st_off, h, mask=d_mask[None, :, None])

            dA = tl.exp2(dt[:, None, :, None] * A2[None, :, :, :])  # (T, NG, BD, NL)
            x = (dt * u)[:, None, :, None] * Bt[:, :, None, :]
            x = tl.where(t4 == 0, x + dA * h[None, :, :, :], x)  # fold the carried state in
            _, hs = tl.associative_scan((dA, x), 0, _fwd_combine)
            y = tl.sum(tl.sum(hs * Ct[:, :, None, :], axis=1), axis=2)  # (T, BD)
            if HAS_D:
                y = y + u * Dv[None, :]
            if HAS_Z:
                y = y * (zz * tl.sigmoid(zz))
            tl.store(y_ptr + off2, y.to(y_ptr.dtype.element_ty), mask=m2)
            if STORE_STATES and SAVE_T != BLOCK_T:
                # the state after step t starts saved chunk (t + 1) / SAVE_T
                ts = t4 + (c * BLOCK_T + 1)
                k = ts // SAVE_T
                s_mask = ((ts % SAVE_T) == 0) & (k < n_states) & d_mask[None, None, :, None]
                s_off = ((pid_b * n_states + k) * dim + offs_d[None, None, :, None]) * N + n3[None, :, :, :]
                tl.store(states_ptr + s_off, hs, mask=s_mask)
            h = tl.sum(tl.where(t4 == BLOCK_T - 1, hs, 0.0), axis=0)

    @triton.jit
    def _ss_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dy_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
        batch, dim, L, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        N: tl.constexpr, NG: tl.constexpr, NL: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, VEC: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        offs_t = tl.arange(0, BLOCK_T)
        n3 = tl.arange(0, NG)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]
        n_tn = tl.arange(0, NG)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]
        t4 = offs_t[:, None, None, None]

        A = tl.load(A_ptr + offs_d[None, :, None] * N + n3, mask=d_mask[None, :, None], other=0.0)
        A = A.to(tl.float32)
        A2 = A * 1.4426950408889634
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)

        row = tl.multiple_of(pid_b * dim * L + offs_d.to(tl.int64) * L, VEC)
        bc_base = pid_b * N * L
        part_base = (pid_d * batch + pid_b) * N * L  # dB/dC partials: (n_dblocks, batch, N, L)
        # exp(delta A) * g at the next chunk's start; 4-D reductions keep the tile's layout
        q = tl.sum(tl.zeros((1, NG, BLOCK_D, NL), dtype=tl.float32), axis=0)
        dA_acc = tl.sum(tl.zeros((1, NG, BLOCK_D, NL), dtype=tl.float32), axis=0)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        ones = tl.full((BLOCK_T, NG, BLOCK_D, NL), 1.0, tl.float32)
        st_rows = offs_d[None, :, None] * N + n3
        # chunk c's tiles are loaded during chunk c + 1 (register prefetch)
        c_last = n_chunks - 1
        u_n = _load_rows(u_ptr, row, offs_t, d_mask, c_last, L, BLOCK_T, VEC)
        dt_n = _load_rows(delta_ptr, row, offs_t, d_mask, c_last, L, BLOCK_T, VEC)
        dy_n = _load_rows(dy_ptr, row, offs_t, d_mask, c_last, L, BLOCK_T, VEC)
        B_n = _load_bc(B_ptr, bc_base, n_tn, offs_t, c_last, L, BLOCK_T, VEC)
        C_n = _load_bc(C_ptr, bc_base, n_tn, offs_t, c_last, L, BLOCK_T, VEC)
        h0_n = tl.load(states_ptr + (pid_b * n_chunks + c_last) * dim * N + st_rows,
                       mask=d_mask[None, :, None], other=0.0)
        if HAS_Z:
            z_n = _load_rows(z_ptr, row, offs_t, d_mask, c_last, L, BLOCK_T, VEC)
        for ci in range(0, n_chunks):
            c = n_chunks - 1 - ci
            u = u_n.to(tl.float32)
            dt_raw = dt_n.to(tl.float32)
            dy = dy_n.to(tl.float32)
            Bt = B_n.to(tl.float32)
            Ct = C_n.to(tl.float32)
            h0 = h0_n
            if HAS_Z:
                zz = z_n.to(tl.float32)
            u_n = _load_rows(u_ptr, row, offs_t, d_mask, c - 1, L, BLOCK_T, VEC)
            dt_n = _load_rows(delta_ptr, row, offs_t, d_mask, c - 1, L, BLOCK_T, VEC)
            dy_n = _load_rows(dy_ptr, row, offs_t, d_mask, c - 1, L, BLOCK_T, VEC)
            B_n = _load_bc(B_ptr, bc_base, n_tn, offs_t, c - 1, L, BLOCK_T, VEC)
            C_n = _load_bc(C_ptr, bc_base, n_tn, offs_t, c - 1, L, BLOCK_T, VEC)
            h0_n = tl.load(states_ptr + (pid_b * n_chunks + c - 1) * dim * N + st_rows,
                           mask=d_mask[None, :, None] & ((st_rows * 0 + c) > 0), other=0.0)
            if HAS_Z:
                z_n = _load_rows(z_ptr, row, offs_t, d_mask, c - 1, L, BLOCK_T, VEC)
            t = c * BLOCK_T + offs_t
            t_mask = t < L
            m2 = t_mask[:, None] & d_mask[None, :]
            off2 = row[None, :] + t[:, None]
            if HAS_BIAS:
                dt_raw = dt_raw + bias[None, :]
            if SOFTPLUS:
                dt = _softplus(dt_raw)
            else:
                dt = dt_raw
            dt = tl.where(m2, dt, 0.0)

            # recompute the states inside the chunk
            dA = tl.exp2(dt[:, None, :, None] * A2[None, :, :, :])
            du_dt = dt * u
            x = du_dt[:, None, :, None] * Bt[:, :, None, :]
            x0 = tl.where(t4 == 0, x + dA * h0[None, :, :, :], x)
            _, hs = tl.associative_scan((dA, x0), 0, _fwd_combine)

            if HAS_Z:
                y0 = tl.sum(tl.sum(hs * Ct[:, :, None, :], axis=1), axis=2)
                if HAS_D:
                    y0 = y0 + u * Dv[None, :]
                sz = tl.sigmoid(zz)
                dz = dy * y0 * sz * (1.0 + zz * (1.0 - sz))
                tl.store(dz_ptr + off2, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                dy0 = dy * (zz * sz)
            else:
                dy0 = dy

            # adjoint state, reverse in time; the carry enters at the chunk's last step
            bvec = Ct[:, :, None, :] * dy0[:, None, :, None]
            bvec = tl.where(t4 == BLOCK_T - 1, bvec + q[None, :, :, :], bvec)
            _, g, _ = tl.associative_scan((ones, bvec, dA), 0, _bwd_combine, reverse=True)
            q = tl.sum(tl.where(t4 == 0, dA * g, 0.0), axis=0)

            gh = g * (hs - x)  # g_t * exp(delta_t A) * h_{t-1}
            dA_acc += tl.sum(gh * dt[:, None, :, None], axis=0)
            gB = tl.sum(tl.sum(g * Bt[:, :, None, :], axis=1), axis=2)  # (T, BD)
            ghA = tl.sum(tl.sum(gh * A[None, :, :, :], axis=1), axis=2)
            ddt = u * gB + ghA
            du = dt * gB
            if HAS_D:
                du = du + dy0 * Dv[None, :]
                dD_acc += tl.sum(dy0 * u, axis=0)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(m2, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + off2, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddelta_ptr + off2, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)

            dBp = tl.sum(g * du_dt[:, None, :, None], axis=2)  # (T, NG, NL)
            dCp = tl.sum(hs * dy0[:, None, :, None], axis=2)
            off_p = part_base + n_tn * L + t[:, None, None]
            tl.store(dB_part_ptr + off_p, dBp, mask=t_mask[:, None, None])
            tl.store(dC_part_ptr + off_p, dCp, mask=t_mask[:, None, None])

        dA_off = (pid_b * dim + offs_d[None, :, None]) * N + n3
        tl.store(dA_part_ptr + dA_off, dA_acc, mask=d_mask[None, :, None])
        if HAS_D:
            tl.store(dD_part_ptr + pid_b * dim + offs_d, dD_acc, mask=d_mask)
        if HAS_BIAS:
            tl.store(dbias_part_ptr + pid_b * dim + offs_d, dbias_acc, mask=d_mask)


class ScanConfig(NamedTuple):
    """Tile shape of one program: ``BLOCK_T`` steps x ``d_state = ng * (d_state // ng)`` x
    ``BLOCK_D = bdt * max(1, 32 // nl) * num_warps`` channels (``bdt`` channels per thread)."""

    ng: int
    block_t: int
    num_warps: int
    bdt: int = 1


# Defaults for d_state 16 from the H100 sweeps in benchmarks/NOTES_selective_scan.md; ng is
# clipped for smaller states (see _resolve).
_FWD_CONFIG = ScanConfig(ng=4, block_t=16, num_warps=1, bdt=1)


def _bwd_config(L: int) -> ScanConfig:
    """Backward tile (its block_t is also the forward's state-saving interval) for length L."""
    if L <= 512:
        return ScanConfig(ng=4, block_t=4, num_warps=1, bdt=2)
    return ScanConfig(ng=4, block_t=8, num_warps=1, bdt=1)


def _fwd_config_saving(save_t: int) -> ScanConfig:
    """Forward tile when states are saved: chunk = save interval (cheap stores) unless that is short."""
    return ScanConfig(ng=4, block_t=save_t, num_warps=1) if save_t >= 8 else _FWD_CONFIG


def _resolve(cfg: ScanConfig, d_state: int, dim: int) -> Tuple[int, int, int, int, int]:
    """Return (NG, NL, BLOCK_D, BLOCK_T, num_warps) for a config, a state size and a channel count."""
    ng = max(1, min(cfg.ng, d_state))
    nl = d_state // ng
    block_d = cfg.bdt * max(1, 32 // nl) * cfg.num_warps
    block_d = max(1, min(block_d, triton.next_power_of_2(dim)))
    return ng, nl, block_d, cfg.block_t, cfg.num_warps


def _vec(L: int, block_t: int) -> int:
    """Largest power of two dividing L, at most 8 and block_t: lets Triton vectorize row loads."""
    v = 1
    while v < 8 and v < block_t and L % (2 * v) == 0:
        v *= 2
    return v


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> Tuple[int, int, int, int]:
    """The shape checks of the PyTorch scan plus the kernel's limits; returns (batch, dim, L, n)."""
    if A.dim() == 2:  # the kernel's limit first: B and C are then checked against this state size
        n = A.shape[1]
        if n < 1 or n > _MAX_STATE or (n & (n - 1)) != 0:
            raise ValueError(f"d_state must be a power of two <= {_MAX_STATE}, got {n}")
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, L = u.shape
    n = A.shape[1]
    if L < 1:
        raise ValueError("length must be >= 1")
    return batch, dim, L, n


def _launch_forward(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
    delta_softplus: bool, store_states: bool,
    config: Optional[ScanConfig] = None, poison: bool = False, save_t: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the forward kernel on contiguous inputs.

    Returns y (batch, dim, length) in u's dtype, and when ``store_states`` the fp32 state before
    every ``save_t`` steps (the backward's chunk, default its config's block_t),
    (batch, cdiv(length, save_t), dim, state). ``poison`` fills the outputs with NaN first (tests).
    """
    batch, dim, L, n = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
    save_t = save_t or _bwd_config(L).block_t
    if config is None:
        config = _fwd_config_saving(save_t) if store_states else _FWD_CONFIG
    ng, nl, bd, bt, nw = _resolve(config, n, dim)
    if store_states and bt % save_t != 0:
        bt = max(bt, save_t)  # powers of two: the larger is a multiple of the smaller
        if bt % save_t != 0:
            raise ValueError(f"block_t {bt} is not a multiple of save_t {save_t}")
    n_chunks = triton.cdiv(L, bt)
    n_states = triton.cdiv(L, save_t) if store_states else 1
    y = torch.full_like(u, float("nan")) if poison else torch.empty_like(u)
    states = (
        (torch.full if poison else torch.empty)(
            (batch, n_states, dim, n), *([float("nan")] if poison else []), device=u.device,
            dtype=torch.float32)
        if store_states else y  # dummy pointer, never written
    )
    grid = (batch, triton.cdiv(dim, bd))
    _ss_fwd_kernel[grid](
        u, delta, A, B, C,
        D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, y, states,
        dim, L, n_chunks, n_states,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), STORE_STATES=store_states, SAVE_T=save_t if store_states else bt,
        N=n, NG=ng, NL=nl, BLOCK_D=bd, BLOCK_T=bt, VEC=_vec(L, bt), num_warps=nw,
    )
    return y, (states if store_states else None)


def _launch_backward(
    dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor], delta_softplus: bool, states: torch.Tensor,
    config: Optional[ScanConfig] = None, poison: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Run the backward kernel; returns (du, ddelta, dA, dB, dC, dD, dz, dbias), Nones where absent.

    ``states`` must come from ``_launch_forward`` with the same ``block_t``. ``poison`` fills every
    output and partial buffer with NaN first (tests).
    """
    batch, dim, L, n = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
    ng, nl, bd, bt, nw = _resolve(config or _bwd_config(L), n, dim)
    n_chunks = triton.cdiv(L, bt)
    if states.shape != (batch, n_chunks, dim, n):
        raise ValueError(f"states shape {tuple(states.shape)} does not match block_t={bt}")
    n_db = triton.cdiv(dim, bd)
    dev = u.device
    f32 = torch.float32

    def new(shape, dtype):
        if poison:
            return torch.full(shape, float("nan"), device=dev, dtype=dtype)
        return torch.empty(shape, device=dev, dtype=dtype)

    du = new(u.shape, u.dtype)
    ddelta = new(delta.shape, delta.dtype)
    dz = new(z.shape, z.dtype) if z is not None else None
    dA_part = new((batch, dim, n), f32)
    dB_part = new((n_db, batch, n, L), f32)
    dC_part = new((n_db, batch, n, L), f32)
    dD_part = new((batch, dim), f32) if D is not None else None
    dbias_part = new((batch, dim), f32) if delta_bias is not None else None
    dummy = dA_part
    grid = (batch, n_db)
    _ss_bwd_kernel[grid](
        u, delta, A, B, C,
        D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, states, dy,
        du, ddelta, dz if dz is not None else dummy, dA_part, dB_part, dC_part,
        dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
        batch, dim, L, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        N=n, NG=ng, NL=nl, BLOCK_D=bd, BLOCK_T=bt, VEC=_vec(L, bt), num_warps=nw,
    )
    dA = dA_part.sum(0).to(A.dtype)
    dB = (dB_part.sum(0) if n_db > 1 else dB_part[0]).to(B.dtype)
    dC = (dC_part.sum(0) if n_db > 1 else dC_part[0]).to(C.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def _contiguous(*tensors):
    return tuple(t.contiguous() if t is not None else None for t in tensors)


class _SelectiveScanTriton(torch.autograd.Function):
    """Eager autograd wrapper (kept for torch < 2.4, which has no ``torch.library.custom_op``)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        need_grad = any(ctx.needs_input_grad[:8])
        y, states = _launch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                    store_states=need_grad)
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus = bool(delta_softplus)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias = _launch_backward(
            dy.contiguous(), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None


_USE_CUSTOM_OP = _HAS_TRITON and hasattr(torch.library, "custom_op")

if _USE_CUSTOM_OP:
    # A registered op with its own autograd formula: torch.compile keeps it as one opaque call in
    # the graph (no graph break, unlike a compiler-disabled autograd.Function).

    @torch.library.custom_op("mambamim::selective_scan", mutates_args=())
    def _ss_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
               delta_softplus: bool, store_states: bool) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        y, states = _launch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, store_states)
        return y, (states if states is not None else u.new_empty(0, dtype=torch.float32))

    @_ss_op.register_fake
    def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, store_states):
        batch, dim, L, n = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
        shape = (batch, triton.cdiv(L, _bwd_config(L).block_t), dim, n) if store_states else (0,)
        return torch.empty_like(u), u.new_empty(shape, dtype=torch.float32)

    @torch.library.custom_op("mambamim::selective_scan_backward", mutates_args=())
    def _ss_bwd_op(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                   delta_bias: Optional[torch.Tensor], delta_softplus: bool,
                   states: torch.Tensor) -> List[torch.Tensor]:  # fmt: skip
        grads = _launch_backward(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states)
        return [g if g is not None else u.new_empty(0) for g in grads]

    @_ss_bwd_op.register_fake
    def _(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states):
        return [torch.empty_like(t) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, z, delta_bias)]

    def _ss_setup(ctx, inputs, output):
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, _ = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
        ctx.delta_softplus = bool(delta_softplus)
        ctx.present = [t is not None for t in (D, z, delta_bias)]

    def _ss_backward(ctx, dy, _dstates):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        grads = _ss_bwd_op(dy.contiguous(), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states)
        grads = list(grads[:5]) + [g if p else None for g, p in zip(grads[5:], ctx.present)]
        return (*grads, None, None)

    torch.library.register_autograd("mambamim::selective_scan", _ss_backward, setup_context=_ss_setup)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Fused selective scan; differentiable in every tensor argument.

    Args:
        u, delta: (batch, dim, length), any float dtype.
        A: (dim, state), state a power of two up to 64.
        B, C: (batch, state, length), shared across channels.
        D: optional (dim,) skip weight.
        z: optional (batch, dim, length) gate; y is multiplied by silu(z).
        delta_bias: optional (dim,) added to delta before the softplus.
        delta_softplus: apply softplus to delta.

    Returns:
        y: (batch, dim, length) in u's dtype. Accumulation and the state are fp32.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if not _HAS_TRITON:
        raise RuntimeError("selective_scan_triton needs triton, which is not installed")
    u, delta, A, B, C, D, z, delta_bias = _contiguous(u, delta, A, B, C, D, z, delta_bias)
    if _USE_CUSTOM_OP:
        need_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
        return _ss_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), need_grad)[0]
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
