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
and promoted. ``exp`` runs once per (b, d, n, t) in both passes. bf16 inputs of even length (and 4-byte
aligned) are read as int32 words holding two steps and unpacked with shifts: a bf16-to-fp32 conversion
would let Triton move the layout change in front of it, and the elementwise work (softplus, gating) onto
the 4-D tile's layout, where each value is repeated over the state lanes.

Long sequences with few programs (``_segments``: e.g. batch 1 at L = 8192) are split into segments of whole
chunks, one program per (batch, channel block, segment). The state is linear in its start, so a first pass
(the forward kernel with ``FIRST_PASS``) computes each segment's end state from a zero start and its sum of
delta; the main pass starts segment ``s`` from ``h = exp(A * sum_j) * h + end_j`` folded over the segments
``j < s``. The backward splits the same way (``_ss_bwd_seg_kernel``): the adjoint's carry into a segment is
linear in the carry out of the next one, with the same decay. The first pass recomputes its segments'
exponentials, so the split pays only where the programs are too few to fill the GPU.

Backward: the forward stores the state at every chunk start, ``(batch, n_chunks, dim, state)`` fp32
(a ``d_state / BLOCK_T`` fraction of one fp32 ``(batch, dim, length)`` tensor). The backward walks
the chunks in reverse; for each it recomputes the states inside the chunk from the stored start
state, then runs a reverse scan for the adjoint ``g_t = dL/dh_t``::

    g_t = C_t * dy0_t + exp(delta_{t+1} A) * g_{t+1}

The coefficient of ``g_{t+1}`` belongs to step ``t+1``; the reverse scan carries the first
coefficient of each segment (``_bwd_combine``) so no shifted copy of ``exp(delta A)`` is needed. It runs
as a forward scan of the time-flipped tile (``tl.flip``, register moves): Triton 3.6 lowers ``reverse=True``
with warp shuffles even along an axis that lives inside each thread.
``exp(delta_t A) * h_{t-1}`` is taken as ``h_t - x_t``. Gradients of the shared ``B``/``C`` are
per-program partial sums over the program's channels, summed over channel blocks with torch;
``A``, ``D`` and ``delta_bias`` gradients are accumulated in registers over time and summed over the
batch with torch (deterministic, no atomics).
"""

from __future__ import annotations

import functools
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
    def _softplus(x, POLY: tl.constexpr):
        # log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]: no overflow, and x itself above
        # 17 as torch's threshold 20 gives. POLY: log1p(e) = e * q(e), q a degree-8 least-squares fit of
        # log1p(e) / e on [0, 1] (float64, 2,000 Chebyshev nodes), at most 1.2e-7 off in fp32 Horner. Else
        # libdevice's log(1 + e), 6e-8 off (absolute) where e is below fp32's resolution near 1.
        # Which is faster depends on delta's dtype (H100, L = 8192, benchmarks/NOTES_selective_scan.md): bf16
        # forward 0.651 ms with POLY, 0.690 without; fp32 0.781 with, 0.666 without. _delta picks POLY for
        # half-precision delta.
        if not POLY:
            return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        e = tl.exp2(tl.abs(x) * -1.4426950408889634)  # tl.exp spends 48 more instructions a chunk
        q = 0.005253457929939032 * e - 0.02958850748836994
        q = q * e + 0.07836166769266129
        q = q * e - 0.13674770295619965
        q = q * e + 0.19111430644989014
        q = q * e - 0.24844369292259216
        q = q * e + 0.33319270610809326
        q = q * e - 0.49999502301216125
        q = q * e + 1.0
        return tl.maximum(x, 0.0) + e * q

    @triton.jit
    def _bf16_pairs(ptr, offs, t2, mask):
        # bf16 values at offs + 2 * t2 and the next step, read as int32 words and unpacked with shifts
        # (little-endian: the earlier step is the low half). Triton hoists a layout conversion above a
        # bf16 -> fp32 conversion, which moved the elementwise work onto the replicated 4-D layout;
        # shifts give it nothing to hoist above.
        w = tl.load((ptr + offs + 2 * t2).to(tl.pointer_type(tl.int32)), mask=mask, other=0)
        return tl.join((w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True))

    @triton.jit
    def _pair_steps(c, L, BLOCK_T: tl.constexpr):
        # chunk c's int32 words of two bf16 steps (L even), and which of them lie in the sequence
        t2 = c * (BLOCK_T // 2) + tl.arange(0, BLOCK_T // 2)
        return t2, (t2 >= 0) & (t2 < L // 2)

    @triton.jit
    def _load_rows(ptr, row, offs_t, d_mask, c, L, BLOCK_T: tl.constexpr, VEC: tl.constexpr):
        # (BLOCK_T, BLOCK_D) tile of a (batch, dim, L) tensor at chunk c; zeros outside. bf16 with VEC >= 2
        # (L even, 4-byte aligned: _vec_for) comes as fp32 in pairs, any other dtype raw.
        # L % VEC == 0: comparing t // VEC keeps the mask constant over VEC steps (vector loads)
        if ptr.dtype.element_ty == tl.bfloat16 and VEC >= 2:
            t2, ok = _pair_steps(c, L, BLOCK_T)
            m2 = ok[:, None] & d_mask[None, :]
            x = _bf16_pairs(ptr, row[None, :], t2[:, None], m2)  # (T / 2, BLOCK_D, 2)
            return tl.reshape(tl.permute(x, (0, 2, 1)), (BLOCK_T, row.shape[0]))
        else:
            t = c * BLOCK_T + offs_t
            m2 = ((t >= 0) & ((t // VEC) < (L // VEC)))[:, None] & d_mask[None, :]
            return tl.load(ptr + row[None, :] + t[:, None], mask=m2, other=0.0)

    @triton.jit
    def _load_bc(ptr, bc_base, n_tn, offs_t, c, L, BLOCK_T: tl.constexpr, VEC: tl.constexpr):
        # (BLOCK_T, NG, NL) tile of a (batch, N, L) tensor at chunk c; zeros outside; dtypes as _load_rows
        rows = tl.multiple_of(n_tn * L, [VEC, VEC, VEC])
        if ptr.dtype.element_ty == tl.bfloat16 and VEC >= 2:
            t2, ok = _pair_steps(c, L, BLOCK_T)
            x = _bf16_pairs(ptr, bc_base + rows, t2[:, None, None], ok[:, None, None])  # (T / 2, NG, NL, 2)
            return tl.reshape(tl.permute(x, (0, 3, 1, 2)), (BLOCK_T, n_tn.shape[1], n_tn.shape[2]))
        else:
            t = c * BLOCK_T + offs_t
            t_mask = (t >= 0) & ((t // VEC) < (L // VEC))
            return tl.load(ptr + bc_base + rows + t[:, None, None], mask=t_mask[:, None, None], other=0.0)

    @triton.jit
    def _program_tiles(pid_b, pid_d, dim, L, A_ptr, N: tl.constexpr, NG: tl.constexpr, NL: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, VEC: tl.constexpr):
        # What every kernel's program starts from: its channels and their mask; the state index
        # n = g * NL + l as (NG, 1, NL) and (1, NG, NL); A as an fp32 (NG, BLOCK_D, NL) tile and times
        # log2(e) (exp(x) = exp2(x * log2(e))); the steps of a chunk, also as (T, 1, 1, 1); the offsets of
        # its rows of u-shaped tensors and of its sample's B / C.
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        n3 = tl.arange(0, NG)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]
        n_tn = tl.arange(0, NG)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]
        A = tl.load(A_ptr + offs_d[None, :, None] * N + n3, mask=d_mask[None, :, None], other=0.0).to(tl.float32)
        offs_t = tl.arange(0, BLOCK_T)
        row = tl.multiple_of(pid_b * dim * L + offs_d.to(tl.int64) * L, VEC)  # (BLOCK_D,)
        return (offs_d, d_mask, n3, n_tn, A, A * 1.4426950408889634, offs_t, offs_t[:, None, None, None], row,
                pid_b * N * L)

    @triton.jit
    def _channel_vector(ptr, offs_d, d_mask, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr):
        # a (dim,) parameter at the program's channels in fp32; zeros when the kernel has none
        if PRESENT:
            return tl.load(ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        else:
            return tl.zeros((BLOCK_D,), dtype=tl.float32)

    @triton.jit
    def _zero_state(NG: tl.constexpr, BLOCK_D: tl.constexpr, NL: tl.constexpr):
        # built as a reduction of a 4-D tile so that loops carry it in the tile's layout
        return tl.sum(tl.zeros((1, NG, BLOCK_D, NL), dtype=tl.float32), axis=0)

    @triton.jit
    def _delta(dt_raw, bias, m2, delta_ptr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # (delta + bias before the softplus, delta as the scan uses it); padded steps get delta 0:
        # exp(0) = 1 and no input, so the state carries through them. The softplus's form follows the dtype
        # delta is stored in (see _softplus).
        if HAS_BIAS:
            dt_raw = dt_raw + bias[None, :]
        if SOFTPLUS:
            dt = _softplus(dt_raw, delta_ptr.dtype.element_ty != tl.float32)
        else:
            dt = dt_raw
        return dt_raw, tl.where(m2, dt, 0.0)

    @triton.jit
    def _states_in_chunk(dt, u, Bt, h, A2, t4):
        # exp(delta A), the inputs delta * B * u, and the states of one chunk (T, NG, BD, NL) from h
        dA = tl.exp2(dt[:, None, :, None] * A2[None, :, :, :])
        x = (dt * u)[:, None, :, None] * Bt[:, :, None, :]
        x0 = tl.where(t4 == 0, x + dA * h[None, :, :, :], x)  # fold the carried state in
        _, hs = tl.associative_scan((dA, x0), 0, _fwd_combine)
        return dA, x, hs

    @triton.jit
    def _adjoint_in_chunk(Ct, dy0, q, dA, t4, BLOCK_T: tl.constexpr):
        # adjoint g_t = C_t dy0_t + exp(delta_{t+1} A) g_{t+1} over one chunk, reverse in time; q (the
        # later chunk's exp(delta A) g at its start) enters at the last step. Returns g and this chunk's q.
        bvec = Ct[:, :, None, :] * dy0[:, None, :, None]
        bvec = tl.where(t4 == BLOCK_T - 1, bvec + q[None, :, :, :], bvec)
        # a forward scan of the time-flipped tile: Triton 3.6 lowers `reverse=True` here with 460 shuffles
        # a chunk (of the backward's 2,776 instructions at T = 8); the flips are register moves
        ones = tl.full(bvec.shape, 1.0, tl.float32)
        _, g, _ = tl.associative_scan((ones, tl.flip(bvec, 0), tl.flip(dA, 0)), 0, _bwd_combine)
        g = tl.flip(g, 0)
        return g, tl.sum(tl.where(t4 == 0, dA * g, 0.0), axis=0)

    @triton.jit
    def _segment_carry(seg_ptr, segdt_ptr, pid_b, j, n_seg, dim, offs_d, d_mask, n3, x, A2,
                       N: tl.constexpr):
        # fold segment j into a carry: exp(A * sum of segment j's delta) * x + segment j's own part
        off = ((pid_b * n_seg + j) * dim + offs_d[None, :, None]) * N + n3
        part = tl.load(seg_ptr + off, mask=d_mask[None, :, None], other=0.0)
        dsum = tl.load(segdt_ptr + (pid_b * n_seg + j) * dim + offs_d, mask=d_mask, other=0.0)
        return tl.exp2(dsum[None, :, None] * A2) * x + part

    @triton.jit
    def _store_segment(seg_ptr, segdt_ptr, pid_b, s, n_seg, dim, offs_d, d_mask, n3, x, dsum,
                       N: tl.constexpr):
        off = ((pid_b * n_seg + s) * dim + offs_d[None, :, None]) * N + n3
        tl.store(seg_ptr + off, x, mask=d_mask[None, :, None])
        tl.store(segdt_ptr + (pid_b * n_seg + s) * dim + offs_d, dsum, mask=d_mask)

    @triton.jit
    def _ss_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, states_ptr,
        seg_ptr, segdt_ptr, dim, L, n_chunks, n_states, seg_chunks, n_seg,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr, SAVE_T: tl.constexpr, SPLIT: tl.constexpr,
        FIRST_PASS: tl.constexpr, N: tl.constexpr, NG: tl.constexpr, NL: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, VEC: tl.constexpr,
    ):
        # Program (batch, channel block, segment s) scans chunks [s * seg_chunks, ...) from the state
        # the earlier segments' first-pass results give (n_seg == 1: one segment from zero).
        # FIRST_PASS (launched without D, z and states): no output; segment s's end state from a zero start
        # and its sum of delta go to seg (batch, n_seg, dim, N) and segdt (batch, n_seg, dim).
        # STORE_STATES: states[b, k] = state before step k * SAVE_T, k < n_states (BLOCK_T % SAVE_T == 0)
        pid_b = tl.program_id(0).to(tl.int64)
        s = tl.program_id(2)
        offs_d, d_mask, n3, n_tn, A, A2, offs_t, t4, row, bc_base = _program_tiles(
            pid_b, tl.program_id(1), dim, L, A_ptr, N, NG, NL, BLOCK_D, BLOCK_T, VEC)
        Dv = _channel_vector(D_ptr, offs_d, d_mask, HAS_D, BLOCK_D)
        bias = _channel_vector(bias_ptr, offs_d, d_mask, HAS_BIAS, BLOCK_D)
        if STORE_STATES and SAVE_T != BLOCK_T:
            if s == 0:  # the state before step 0; every later one is stored after the step before it
                z_off = (pid_b * n_states * dim + offs_d[None, :, None]) * N + n3
                tl.store(states_ptr + z_off, _zero_state(NG, BLOCK_D, NL), mask=d_mask[None, :, None])
        h = _zero_state(NG, BLOCK_D, NL)
        dsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        c0 = 0
        c1 = n_chunks
        if SPLIT or FIRST_PASS:  # constexprs: the unsplit kernel's loop from 0 needs fewer registers
            if SPLIT:
                for j in range(0, s):
                    h = _segment_carry(seg_ptr, segdt_ptr, pid_b, j, n_seg, dim, offs_d, d_mask, n3, h, A2, N)
            c0 = s * seg_chunks
            c1 = tl.minimum(c0 + seg_chunks, n_chunks)
        # chunk c's tiles are loaded during chunk c - 1 (register prefetch hides the load latency)
        u_n = _load_rows(u_ptr, row, offs_t, d_mask, c0, L, BLOCK_T, VEC)
        dt_n = _load_rows(delta_ptr, row, offs_t, d_mask, c0, L, BLOCK_T, VEC)
        B_n = _load_bc(B_ptr, bc_base, n_tn, offs_t, c0, L, BLOCK_T, VEC)
        if not FIRST_PASS:
            C_n = _load_bc(C_ptr, bc_base, n_tn, offs_t, c0, L, BLOCK_T, VEC)
        if HAS_Z:
            z_n = _load_rows(z_ptr, row, offs_t, d_mask, c0, L, BLOCK_T, VEC)
        for c in range(c0, c1):
            u = u_n.to(tl.float32)
            dt_raw = dt_n.to(tl.float32)
            Bt = B_n.to(tl.float32)
            if not FIRST_PASS:
                Ct = C_n.to(tl.float32)
                C_n = _load_bc(C_ptr, bc_base, n_tn, offs_t, c + 1, L, BLOCK_T, VEC)
            if HAS_Z:
                zz = z_n.to(tl.float32)
            u_n = _load_rows(u_ptr, row, offs_t, d_mask, c + 1, L, BLOCK_T, VEC)
            dt_n = _load_rows(delta_ptr, row, offs_t, d_mask, c + 1, L, BLOCK_T, VEC)
            B_n = _load_bc(B_ptr, bc_base, n_tn, offs_t, c + 1, L, BLOCK_T, VEC)
            if HAS_Z:
                z_n = _load_rows(z_ptr, row, offs_t, d_mask, c + 1, L, BLOCK_T, VEC)
            t = c * BLOCK_T + offs_t
            m2 = (t < L)[:, None] & d_mask[None, :]
            _, dt = _delta(dt_raw, bias, m2, delta_ptr, HAS_BIAS, SOFTPLUS)
            if STORE_STATES and SAVE_T == BLOCK_T:
                st_off = ((pid_b * n_states + c) * dim + offs_d[None, :, None]) * N + n3
                tl.store(states_ptr + st_off, h, mask=d_mask[None, :, None])
            _, _, hs = _states_in_chunk(dt, u, Bt, h, A2, t4)
            if FIRST_PASS:
                dsum += tl.sum(dt, axis=0)
            else:
                y = tl.sum(tl.sum(hs * Ct[:, :, None, :], axis=1), axis=2)  # (T, BD)
                if HAS_D:
                    y = y + u * Dv[None, :]
                if HAS_Z:
                    y = y * (zz * tl.sigmoid(zz))
                tl.store(y_ptr + row[None, :] + t[:, None], y.to(y_ptr.dtype.element_ty), mask=m2)
            if STORE_STATES and SAVE_T != BLOCK_T:
                # the state after step t starts saved chunk (t + 1) / SAVE_T
                ts = t4 + (c * BLOCK_T + 1)
                k = ts // SAVE_T
                s_mask = ((ts % SAVE_T) == 0) & (k < n_states) & d_mask[None, None, :, None]
                s_off = ((pid_b * n_states + k) * dim + offs_d[None, None, :, None]) * N + n3[None, :, :, :]
                tl.store(states_ptr + s_off, hs, mask=s_mask)
            h = tl.sum(tl.where(t4 == BLOCK_T - 1, hs, 0.0), axis=0)
        if FIRST_PASS:
            _store_segment(seg_ptr, segdt_ptr, pid_b, s, n_seg, dim, offs_d, d_mask, n3, h, dsum, N)

    @triton.jit
    def _ss_bwd_seg_kernel(
        delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, seg_ptr, segdt_ptr,
        dim, L, n_chunks, seg_chunks, n_seg,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        N: tl.constexpr, NG: tl.constexpr, NL: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, VEC: tl.constexpr,
    ):
        # Split sequences, first backward pass: segment s + 1's q (exp(delta A) g at its start) from a
        # zero carry, and its sum of delta (segment 0's is not needed). The adjoint needs no states.
        pid_b = tl.program_id(0).to(tl.int64)
        s = tl.program_id(2) + 1
        offs_d, d_mask, n3, n_tn, A, A2, offs_t, t4, row, bc_base = _program_tiles(
            pid_b, tl.program_id(1), dim, L, A_ptr, N, NG, NL, BLOCK_D, BLOCK_T, VEC)
        bias = _channel_vector(bias_ptr, offs_d, d_mask, HAS_BIAS, BLOCK_D)
        q = _zero_state(NG, BLOCK_D, NL)
        dsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        c0 = s * seg_chunks
        c1 = tl.minimum(c0 + seg_chunks, n_chunks)
        for ci in range(0, c1 - c0):
            c = c1 - 1 - ci
            t = c * BLOCK_T + offs_t
            m2 = (t < L)[:, None] & d_mask[None, :]
            dt_raw = _load_rows(delta_ptr, row, offs_t, d_mask, c, L, BLOCK_T, VEC).to(tl.float32)
            dy0 = _load_rows(dy_ptr, row, offs_t, d_mask, c, L, BLOCK_T, VEC).to(tl.float32)
            Ct = _load_bc(C_ptr, bc_base, n_tn, offs_t, c, L, BLOCK_T, VEC).to(tl.float32)
            if HAS_Z:
                zz = _load_rows(z_ptr, row, offs_t, d_mask, c, L, BLOCK_T, VEC).to(tl.float32)
                dy0 = dy0 * (zz * tl.sigmoid(zz))
            _, dt = _delta(dt_raw, bias, m2, delta_ptr, HAS_BIAS, SOFTPLUS)
            dA = tl.exp2(dt[:, None, :, None] * A2[None, :, :, :])
            _, q = _adjoint_in_chunk(Ct, dy0, q, dA, t4, BLOCK_T)
            dsum += tl.sum(dt, axis=0)
        _store_segment(seg_ptr, segdt_ptr, pid_b, s, n_seg, dim, offs_d, d_mask, n3, q, dsum, N)

    @triton.jit
    def _bwd_tiles(u_ptr, delta_ptr, dy_ptr, B_ptr, C_ptr, z_ptr, states_ptr, pid_b, c, n_chunks, dim, L, row,
                   bc_base, st_rows, n_tn, offs_t, d_mask, HAS_Z: tl.constexpr, N: tl.constexpr,
                   BLOCK_T: tl.constexpr, VEC: tl.constexpr):
        # chunk c's raw tiles of u, delta, dy, B, C and z (delta's again without z), and the state at its
        # start; zeros outside the sequence (c = -1 after the first chunk)
        u = _load_rows(u_ptr, row, offs_t, d_mask, c, L, BLOCK_T, VEC)
        dt = _load_rows(delta_ptr, row, offs_t, d_mask, c, L, BLOCK_T, VEC)
        dy = _load_rows(dy_ptr, row, offs_t, d_mask, c, L, BLOCK_T, VEC)
        Bt = _load_bc(B_ptr, bc_base, n_tn, offs_t, c, L, BLOCK_T, VEC)
        Ct = _load_bc(C_ptr, bc_base, n_tn, offs_t, c, L, BLOCK_T, VEC)
        h0 = tl.load(states_ptr + (pid_b * n_chunks + c) * dim * N + st_rows,
                     mask=d_mask[None, :, None] & ((st_rows * 0 + c) >= 0), other=0.0)
        if HAS_Z:
            z = _load_rows(z_ptr, row, offs_t, d_mask, c, L, BLOCK_T, VEC)
        else:
            z = dt
        return u, dt, dy, Bt, Ct, h0, z

    @triton.jit
    def _ss_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dy_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
        seg_ptr, segdt_ptr, batch, dim, L, n_chunks, seg_chunks, n_seg,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SPLIT: tl.constexpr, N: tl.constexpr, NG: tl.constexpr, NL: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, VEC: tl.constexpr,
    ):
        # Program (batch, channel block, segment s) walks chunks [s * seg_chunks, ...) in reverse, the
        # adjoint's carry taken from the later segments' first-pass results (n_seg == 1: from zero).
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        s = tl.program_id(2)
        offs_d, d_mask, n3, n_tn, A, A2, offs_t, t4, row, bc_base = _program_tiles(
            pid_b, pid_d, dim, L, A_ptr, N, NG, NL, BLOCK_D, BLOCK_T, VEC)
        Dv = _channel_vector(D_ptr, offs_d, d_mask, HAS_D, BLOCK_D)
        bias = _channel_vector(bias_ptr, offs_d, d_mask, HAS_BIAS, BLOCK_D)
        part_base = (pid_d * batch + pid_b) * N * L  # dB/dC partials: (n_dblocks, batch, N, L)
        # exp(delta A) * g at the next chunk's start
        q = _zero_state(NG, BLOCK_D, NL)
        c0 = 0
        c1 = n_chunks
        if SPLIT:  # a constexpr, as in the forward
            for jj in range(0, n_seg - 1 - s):
                q = _segment_carry(seg_ptr, segdt_ptr, pid_b, n_seg - 1 - jj, n_seg, dim, offs_d, d_mask, n3,
                                   q, A2, N)
            c0 = s * seg_chunks
            c1 = tl.minimum(c0 + seg_chunks, n_chunks)
        dA_acc = _zero_state(NG, BLOCK_D, NL)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        st_rows = offs_d[None, :, None] * N + n3
        # chunk c's tiles are loaded during chunk c + 1 (register prefetch)
        u_n, dt_n, dy_n, B_n, C_n, h0_n, z_n = _bwd_tiles(
            u_ptr, delta_ptr, dy_ptr, B_ptr, C_ptr, z_ptr, states_ptr, pid_b, c1 - 1, n_chunks, dim, L, row,
            bc_base, st_rows, n_tn, offs_t, d_mask, HAS_Z, N, BLOCK_T, VEC)
        for ci in range(0, c1 - c0):
            c = c1 - 1 - ci
            u = u_n.to(tl.float32)
            dt_raw = dt_n.to(tl.float32)
            dy = dy_n.to(tl.float32)
            Bt = B_n.to(tl.float32)
            Ct = C_n.to(tl.float32)
            h0 = h0_n
            if HAS_Z:
                zz = z_n.to(tl.float32)
            u_n, dt_n, dy_n, B_n, C_n, h0_n, z_n = _bwd_tiles(
                u_ptr, delta_ptr, dy_ptr, B_ptr, C_ptr, z_ptr, states_ptr, pid_b, c - 1, n_chunks, dim, L, row,
                bc_base, st_rows, n_tn, offs_t, d_mask, HAS_Z, N, BLOCK_T, VEC)
            t = c * BLOCK_T + offs_t
            t_mask = t < L
            m2 = t_mask[:, None] & d_mask[None, :]
            off2 = row[None, :] + t[:, None]
            dt_raw, dt = _delta(dt_raw, bias, m2, delta_ptr, HAS_BIAS, SOFTPLUS)
            dA, x, hs = _states_in_chunk(dt, u, Bt, h0, A2, t4)  # the states inside the chunk, again

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
            g, q = _adjoint_in_chunk(Ct, dy0, q, dA, t4, BLOCK_T)

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

            dBp = tl.sum(g * (dt * u)[:, None, :, None], axis=2)  # (T, NG, NL)
            dCp = tl.sum(hs * dy0[:, None, :, None], axis=2)
            off_p = part_base + n_tn * L + t[:, None, None]
            tl.store(dB_part_ptr + off_p, dBp, mask=t_mask[:, None, None])
            tl.store(dC_part_ptr + off_p, dCp, mask=t_mask[:, None, None])

        # per-(batch, segment) partials of dA, dD and dbias: (batch, n_seg, dim[, N])
        bs = pid_b * n_seg + s
        tl.store(dA_part_ptr + (bs * dim + offs_d[None, :, None]) * N + n3, dA_acc, mask=d_mask[None, :, None])
        if HAS_D:
            tl.store(dD_part_ptr + bs * dim + offs_d, dD_acc, mask=d_mask)
        if HAS_BIAS:
            tl.store(dbias_part_ptr + bs * dim + offs_d, dbias_acc, mask=d_mask)


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


# Splitting sequences (see the module docstring) pays only where the programs are too few to fill the GPU. On
# an H100 / H200 (benchmarks/RESULTS.md, fourteenth session), at L = 8192: 768 one-warp programs (batch 8 x
# 96 channel blocks, about 6 per SM) ran fastest unsplit, every split slower (the split kernels' 246-255
# registers leave room for 8 warps per SM, so more programs run in waves); batch 1 (96 programs) ran 2.4x
# (forward) and 3.2x (forward + backward) faster in 8 segments. So: split to about this many programs per SM,
# only where that at least doubles them, and into no segment shorter than _MIN_SEGMENT steps (each segment
# costs a first pass, which recomputes its exponentials, and a carry over the earlier segments).
_PROGRAMS_PER_SM = 6
_MIN_SEGMENT = 512


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _segments(device: torch.device, programs: int, L: int) -> int:
    """How many segments to split each sequence into: one (no split) off CUDA, when the programs already
    nearly fill the GPU, or for sequences shorter than two minimum segments."""
    if device.type != "cuda" or L < 2 * _MIN_SEGMENT:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = _PROGRAMS_PER_SM * _sm_count(index) // programs  # rounded down: no second wave
    return max(1, min(want, L // _MIN_SEGMENT))


def _split(n_chunks: int, segments: int) -> Tuple[int, int]:
    """(chunks per segment, number of segments) for about ``segments`` equal segments of whole chunks."""
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    seg_chunks = triton.cdiv(n_chunks, segments)
    return seg_chunks, triton.cdiv(n_chunks, seg_chunks)


def _vec(L: int, block_t: int) -> int:
    """Largest power of two dividing L, at most 8 and block_t: lets Triton vectorize row loads."""
    v = 1
    while v < 8 and v < block_t and L % (2 * v) == 0:
        v *= 2
    return v


def _vec_for(L: int, block_t: int, *tensors: Optional[torch.Tensor]) -> int:
    """``_vec``, or 1 where a bf16 tensor starts off a 4-byte boundary (an offset view): VEC >= 2 reads
    bf16 as int32 pairs."""
    if any(t is not None and t.dtype == torch.bfloat16 and t.data_ptr() % 4 for t in tensors):
        return 1
    return _vec(L, block_t)


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
    segments: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the forward kernel on contiguous inputs.

    Returns y (batch, dim, length) in u's dtype, and when ``store_states`` the fp32 state before
    every ``save_t`` steps (the backward's chunk, default its config's block_t),
    (batch, cdiv(length, save_t), dim, state). ``segments`` splits each sequence into about that many
    segments (default: ``_segments``' choice). ``poison`` fills the outputs with NaN first (tests).
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
    n_db = triton.cdiv(dim, bd)
    seg_chunks, n_seg = _split(n_chunks, segments if segments is not None else _segments(u.device, batch * n_db, L))
    bias = delta_bias if delta_bias is not None else u
    tiles = dict(N=n, NG=ng, NL=nl, BLOCK_D=bd, BLOCK_T=bt, VEC=_vec_for(L, bt, u, delta, B, C, z), num_warps=nw)
    seg, segdt = y, y  # dummy pointers unless split
    if n_seg > 1:
        seg = torch.empty((batch, n_seg, dim, n), device=u.device, dtype=torch.float32)
        segdt = torch.empty((batch, n_seg, dim), device=u.device, dtype=torch.float32)
        _ss_fwd_kernel[(batch, n_db, n_seg - 1)](
            u, delta, A, B, C, u, u, bias, y, y, seg, segdt, dim, L, n_chunks, 1, seg_chunks, n_seg,
            HAS_D=False, HAS_Z=False, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            STORE_STATES=False, SAVE_T=bt, SPLIT=False, FIRST_PASS=True, **tiles)
    _ss_fwd_kernel[(batch, n_db, n_seg)](
        u, delta, A, B, C,
        D if D is not None else u, z if z is not None else u, bias, y, states,
        seg, segdt, dim, L, n_chunks, n_states, seg_chunks, n_seg,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), STORE_STATES=store_states, SAVE_T=save_t if store_states else bt,
        SPLIT=n_seg > 1, FIRST_PASS=False, **tiles,
    )
    return y, (states if store_states else None)


def _launch_backward(
    dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor], delta_softplus: bool, states: torch.Tensor,
    config: Optional[ScanConfig] = None, poison: bool = False, segments: Optional[int] = None,
) -> Tuple[torch.Tensor, ...]:
    """Run the backward kernel; returns (du, ddelta, dA, dB, dC, dD, dz, dbias), Nones where absent.

    ``states`` must come from ``_launch_forward`` with the same ``block_t`` (its segments do not
    matter). ``segments`` as for the forward. ``poison`` fills every output and partial buffer with
    NaN first (tests).
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

    seg_chunks, n_seg = _split(n_chunks, segments if segments is not None else _segments(dev, batch * n_db, L))
    du = new(u.shape, u.dtype)
    ddelta = new(delta.shape, delta.dtype)
    dz = new(z.shape, z.dtype) if z is not None else None
    dA_part = new((batch, n_seg, dim, n), f32)
    dB_part = new((n_db, batch, n, L), f32)
    dC_part = new((n_db, batch, n, L), f32)
    dD_part = new((batch, n_seg, dim), f32) if D is not None else None
    dbias_part = new((batch, n_seg, dim), f32) if delta_bias is not None else None
    dummy = dA_part
    z_, bias_ = (t if t is not None else dummy for t in (z, delta_bias))
    tiles = dict(N=n, NG=ng, NL=nl, BLOCK_D=bd, BLOCK_T=bt, VEC=_vec_for(L, bt, u, delta, B, C, z, dy),
                 num_warps=nw)
    seg, segdt = dummy, dummy
    if n_seg > 1:
        seg = torch.empty((batch, n_seg, dim, n), device=dev, dtype=f32)
        segdt = torch.empty((batch, n_seg, dim), device=dev, dtype=f32)
        _ss_bwd_seg_kernel[(batch, n_db, n_seg - 1)](
            delta, A, C, z_, bias_, dy, seg, segdt, dim, L, n_chunks, seg_chunks, n_seg,
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), **tiles)
    _ss_bwd_kernel[(batch, n_db, n_seg)](
        u, delta, A, B, C, D if D is not None else dummy, z_, bias_, states, dy,
        du, ddelta, dz if dz is not None else dummy, dA_part, dB_part, dC_part,
        dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
        seg, segdt, batch, dim, L, n_chunks, seg_chunks, n_seg,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), SPLIT=n_seg > 1, **tiles,
    )
    dA = dA_part.sum((0, 1)).to(A.dtype)
    dB = (dB_part.sum(0) if n_db > 1 else dB_part[0]).to(B.dtype)
    dC = (dC_part.sum(0) if n_db > 1 else dC_part[0]).to(C.dtype)
    dD = dD_part.sum((0, 1)).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
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
