"""TOKI's forward in Triton: the same doubling scan as :func:`mambamim.ops.toki.toki_fill`, without autograd.

The work, in units that each program of a launch takes one or more of:

- interpolation units (one per sample and channel block): the previous and next visible position of every
  token of the padded sequence (``tl.associative_scan`` max / reverse min over the visibility row), ``n``
  (distance to the previous visible token) and the interpolation ``s_n`` (the token itself where visible).
  Masked tokens are never loaded.
- doubling step ``j`` (shift ``s = 2^j``, ``ceil(log2(L + 2))`` steps): ``z[t] += [n_t >= s] A^s z[t-s]``
  as tiled matmuls with the gate and the shift in the loads (row tiles whose gate is all off skip the
  matmul), plus the tiles of ``A^s @ A^s`` for the next step. The last step writes the output: the tokens
  bit-exact where visible, the filled values cast to their dtype elsewhere.

Every step reads what the previous one wrote anywhere in the sequence and in ``A^s``, so the steps need a
grid-wide synchronisation between them. Two ways, same units, same arithmetic, bit-identical results:

- ``fused=True`` (the default): **one** launch of a persistent kernel (up to two programs per SM) which
  walks the phases and waits at a grid barrier (an atomic counter) between them. It also skips the steps
  past the longest masked run, which the interpolation phase measures on the GPU (a scan sized for the
  whole sequence otherwise runs all ``ceil(log2(L + 2))`` steps, most of them on nothing but ``A``'s powers).
  Eagerly launched as a cooperative grid, so that the driver refuses a grid whose programs cannot all be
  resident rather than let the barrier wait forever; inside a CUDA graph capture a plain launch of at most
  one program per SM, which is always resident.
- ``fused=False``: one launch per phase (``1 + ceil(log2(L + 2))``), the kernel boundary as the barrier;
  eagerly host-bound (nine launches at the pre-training shape), and the fallback when the persistent grid
  does not launch. On an H200 (benchmarks/RESULTS.md, fourteenth session) the persistent kernel was
  bit-identical to it and took 0.167 / 0.181 ms eagerly (fp32 / bf16) against 0.271 / 0.338 ms.

Matmuls run as ``tf32x3`` (three TF32 products: float32 accuracy on tensor cores). Intermediate state,
which another program may have written, is loaded with ``.cg`` (from L2, not the SM's own L1), and after
the barrier's acquiring atomics.
"""

from __future__ import annotations

import logging
import math

import torch

from mambamim.ops._triton import HAS_TRITON, tl, triton

__all__ = ["toki_fill_triton", "supports"]

log = logging.getLogger(__name__)

_BM, _BN, _BK = 64, 64, 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_T = 4096  # an interpolation unit holds a whole padded sequence
_PREP_TILE = 16384  # elements of its (sequence, channels) tile with 8 warps; half that with the persistent kernel's 4
_WARPS = 4


def supports(tokens: torch.Tensor) -> bool:
    """True where :func:`toki_fill_triton` applies: CUDA tensors of a 16/32-bit float dtype, sequences of at
    most ``_MAX_T - 2`` tokens, Triton present."""
    return HAS_TRITON and tokens.is_cuda and tokens.dtype in _DTYPES and tokens.shape[1] + 2 <= _MAX_T


if HAS_TRITON:

    @triton.jit
    def _max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _min(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def _prep_unit(u, tok_ptr, vis_ptr, edge_ptr, z_ptr, n_ptr, max_ptr, L, C, TP: tl.constexpr, BC: tl.constexpr):
        # Unit u = (sample b, channel block). Padded position t in [0, T), T = L + 2: 0 and T - 1 are the edges.
        nc = tl.cdiv(C, BC)
        b = u // nc
        c = (u % nc) * BC + tl.arange(0, BC)
        cm = c < C
        T = L + 2
        t = tl.arange(0, TP)
        is_tok = (t >= 1) & (t <= L)
        vis = tl.load(vis_ptr + b * L + t - 1, mask=is_tok, other=1) != 0  # edges and padding count as visible
        prev = tl.associative_scan(tl.where(vis, t, 0), 0, _max)
        nxt = tl.associative_scan(tl.where(vis, t, TP), 0, _min, reverse=True)
        n = t - prev
        q2 = (nxt - prev + 1).to(tl.float32)  # Q + 2; 1 at a visible token
        edge = tl.load(edge_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        lt, rt = (prev >= 1) & (prev <= L), (nxt >= 1) & (nxt <= L)
        row = b.to(tl.int64) * L
        yl = tl.load(tok_ptr + (row + prev - 1)[:, None] * C + c[None, :], mask=lt[:, None] & cm[None, :], other=0.0)
        yr = tl.load(tok_ptr + (row + nxt - 1)[:, None] * C + c[None, :], mask=rt[:, None] & cm[None, :], other=0.0)
        yl = tl.where(lt[:, None], yl.to(tl.float32), edge)
        yr = tl.where(rt[:, None], yr.to(tl.float32), edge)
        nf = n.to(tl.float32)[:, None]
        s = ((q2[:, None] - nf) * yl + nf * yr) / q2[:, None]
        tm = t < T
        zrow = b.to(tl.int64) * T + t
        tl.store(z_ptr + zrow[:, None] * C + c[None, :], s, mask=tm[:, None] & cm[None, :])
        if u % nc == 0:
            tl.store(n_ptr + zrow, n.to(tl.float32), mask=tm)  # float: it shares the float32 workspace
            if max_ptr is not None:
                tl.atomic_max(max_ptr, tl.max(tl.where(tm, n, 0), axis=0))  # the longest masked run, plus one

    @triton.jit
    def _square_unit(q, p_ptr, p2_ptr, C, BN: tl.constexpr, BK: tl.constexpr):
        # One (BN, BN) tile of P2 = P @ P.
        nt = tl.cdiv(C, BN)
        i = (q // nt) * BN + tl.arange(0, BN)
        j = (q % nt) * BN + tl.arange(0, BN)
        acc = tl.zeros((BN, BN), dtype=tl.float32)
        for k0 in range(0, C, BK):
            k = k0 + tl.arange(0, BK)
            a = tl.load(p_ptr + i[:, None] * C + k[None, :], mask=(i[:, None] < C) & (k[None, :] < C), other=0.0,
                        cache_modifier=".cg")  # fmt: skip
            m = tl.load(p_ptr + k[:, None] * C + j[None, :], mask=(k[:, None] < C) & (j[None, :] < C), other=0.0,
                        cache_modifier=".cg")  # fmt: skip
            acc += tl.dot(a, m, input_precision="tf32x3")
        tl.store(p2_ptr + i[:, None] * C + j[None, :], acc, mask=(i[:, None] < C) & (j[None, :] < C))

    @triton.jit
    def _write_out(res, m, cols, mm, cm, tok_ptr, vis_ptr, out_ptr, T, L, C):
        # The last step: tokens bit-exact where visible, the filled values elsewhere; the edges are dropped.
        b = m // T
        t = m % T
        tok = mm & (t >= 1) & (t <= L)
        orow = b.to(tl.int64) * L + t - 1
        vis = tl.load(vis_ptr + orow, mask=tok, other=0) != 0
        om = tok[:, None] & cm[None, :]
        keep = tl.load(tok_ptr + orow[:, None] * C + cols[None, :], mask=om & vis[:, None], other=0.0)
        val = tl.where(vis[:, None], keep, res.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + orow[:, None] * C + cols[None, :], val, mask=om)

    @triton.jit
    def _z_unit(u, z_ptr, n_ptr, p_ptr, z2_ptr, tok_ptr, vis_ptr, out_ptr, M, T, L, S, C, last,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
        # One (BM rows, BN channels) tile of z2 = z + [n >= S] shift_S(z) @ P^T; rows m = b * T + t.
        nt = tl.cdiv(C, BN)
        m = (u // nt) * BM + tl.arange(0, BM)
        cols = (u % nt) * BN + tl.arange(0, BN)
        mm, cm = m < M, cols < C
        gate = mm & (tl.load(n_ptr + m, mask=mm, other=0.0, cache_modifier=".cg") >= S)  # n_t >= S: same sample
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if tl.max(gate.to(tl.int32), axis=0) > 0:
            src = (m - S).to(tl.int64)
            for k0 in range(0, C, BK):
                k = k0 + tl.arange(0, BK)
                km = k < C
                a = tl.load(z_ptr + src[:, None] * C + k[None, :], mask=gate[:, None] & km[None, :], other=0.0,
                            cache_modifier=".cg")  # fmt: skip
                pt = tl.load(p_ptr + cols[None, :] * C + k[:, None], mask=km[:, None] & cm[None, :], other=0.0,
                             cache_modifier=".cg")  # fmt: skip
                acc += tl.dot(a, pt, input_precision="tf32x3")  # (z @ P^T)[m, c] = sum_k z[m, k] P[c, k]
        both = mm[:, None] & cm[None, :]
        rows = m.to(tl.int64)
        res = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=both, other=0.0, cache_modifier=".cg") + acc
        if last:
            _write_out(res, m, cols, mm, cm, tok_ptr, vis_ptr, out_ptr, T, L, C)
        else:
            tl.store(z2_ptr + rows[:, None] * C + cols[None, :], res, mask=both)

    @triton.jit
    def _step_units(u, z_ptr, n_ptr, p_ptr, z2_ptr, p2_ptr, tok_ptr, vis_ptr, out_ptr, M, T, L, S, C, last,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
        # Units of a doubling step: the z tiles, then (unless last) the tiles of P @ P for the next step.
        z_tiles = tl.cdiv(M, BM) * tl.cdiv(C, BN)
        if u < z_tiles:
            _z_unit(u, z_ptr, n_ptr, p_ptr, z2_ptr, tok_ptr, vis_ptr, out_ptr, M, T, L, S, C, last, BM, BN, BK)
        else:
            _square_unit(u - z_tiles, p_ptr, p2_ptr, C, BN, BK)

    @triton.jit
    def _prep_kernel(tok_ptr, vis_ptr, edge_ptr, z_ptr, n_ptr, L, C, TP: tl.constexpr, BC: tl.constexpr):
        _prep_unit(tl.program_id(0), tok_ptr, vis_ptr, edge_ptr, z_ptr, n_ptr, None, L, C, TP, BC)

    @triton.jit
    def _step_kernel(z_ptr, n_ptr, p_ptr, z2_ptr, p2_ptr, tok_ptr, vis_ptr, out_ptr, M, T, L, S, C,
                     LAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
        _step_units(tl.program_id(0), z_ptr, n_ptr, p_ptr, z2_ptr, p2_ptr, tok_ptr, vis_ptr, out_ptr,
                    M, T, L, S, C, LAST, BM, BN, BK)  # fmt: skip

    @triton.jit
    def _grid_sync(bar_ptr):
        # Every program adds 1 but the first, which adds 2^31 - (programs - 1): the counter's sign bit flips
        # exactly when all have arrived, and the counter ends where a next barrier expects it (0 or 2^31).
        # Every poll is an acquiring atomic whose value is used: a version that polled with volatile loads and
        # then issued one acquiring atomic with its result unused computed wrong values with 3 programs on an
        # H100 (most likely that atomic lost its acquire semantics, PTX's `red` has none, and the dot operands'
        # asynchronous copies were served from a stale L1).
        nprog = tl.num_programs(0)
        inc = tl.where(tl.program_id(0) == 0, (2147483649 - nprog.to(tl.int64)).to(tl.int32), 1)
        tl.debug_barrier()  # this program's stores happen before its arrival (release)
        old = tl.atomic_add(bar_ptr, inc, sem="release")
        cur = tl.atomic_add(bar_ptr, 0, sem="acquire")
        while (old ^ cur) >= 0:
            cur = tl.atomic_add(bar_ptr, 0, sem="acquire")
        tl.debug_barrier()

    @triton.jit
    def _fused_kernel(tok_ptr, vis_ptr, edge_ptr, a_ptr, ws_ptr, out_ptr, sync_ptr, B, L, C,
                      TP: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr):  # fmt: skip
        # Persistent: program i takes units i, i + programs, ... of each phase. ws: z (two buffers, ping-pong),
        # A^(2^j) (two; step 0 reads A itself), n. sync_ptr: [barrier, longest run + 1], zeroed.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        T = L + 2
        M = B * T
        MC = M.to(tl.int64) * C
        z_ptr = ws_ptr
        pw_ptr = ws_ptr + 2 * MC
        n_ptr = pw_ptr + 2 * C * C
        for u in range(pid, B * tl.cdiv(C, BC), nprog):
            _prep_unit(u, tok_ptr, vis_ptr, edge_ptr, z_ptr, n_ptr, sync_ptr + 1, L, C, TP, BC)
        _grid_sync(sync_ptr)
        # Step j changes only rows with n >= 2^j: the steps past the longest run are skipped (at least one
        # step runs: the last writes the output). No host sync: the bound is read here, on the GPU.
        n_max = tl.load(sync_ptr + 1, cache_modifier=".cg")
        steps = 1
        while (1 << steps) <= n_max:
            steps += 1
        nt = tl.cdiv(C, BN)
        for j in range(0, steps):
            if j > 0:
                _grid_sync(sync_ptr)
            last = j == steps - 1
            zin = z_ptr + (j % 2) * MC
            zout = z_ptr + ((j + 1) % 2) * MC
            pin = pw_ptr + ((j + 1) % 2) * C * C
            if j == 0:
                pin = a_ptr
            pout = pw_ptr + (j % 2) * C * C
            units = tl.cdiv(M, BM) * nt + tl.where(last, 0, nt * nt)
            for u in range(pid, units, nprog):
                _step_units(u, zin, n_ptr, pin, zout, pout, tok_ptr, vis_ptr, out_ptr, M, T, L, 1 << j, C, last,
                            BM, BN, BK)  # fmt: skip


def _prep_tiles(T: int, C: int, tile: int = _PREP_TILE) -> tuple[int, int]:
    tp = triton.next_power_of_2(T)
    return tp, min(64, triton.next_power_of_2(C), max(1, tile // tp))


def toki_fill_triton(tokens: torch.Tensor, visible: torch.Tensor, A: torch.Tensor, edge_token: torch.Tensor,
                     fused: bool = True, programs: int | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`mambamim.ops.toki.toki_fill` (arguments checked there) without autograd.

    ``fused``: one persistent launch (default), or one launch per phase (module docstring). ``programs``:
    the persistent grid (default up to two per SM; on a CPU under ``TRITON_INTERPRET=1``, whose programs run
    one after another, 1, the default there).
    """
    if programs is not None and (not isinstance(programs, int) or programs < 1):
        raise ValueError(f"programs must be a positive int or None, got {programs!r}")
    B, L, C = tokens.shape
    M = B * (L + 2)
    tokens = tokens.contiguous()
    vis = visible.contiguous().view(torch.uint8)
    edge = edge_token.detach().contiguous()
    a32 = A.detach().to(torch.float32).contiguous()
    ws = torch.empty(2 * M * C + 2 * C * C + M, device=tokens.device, dtype=torch.float32)  # z, z, P, P, n
    out = torch.empty_like(tokens)
    if fused:
        try:
            _launch_fused(tokens, vis, edge, a32, ws, out, programs)
            return out
        except RuntimeError as err:  # e.g. a cooperative grid the device cannot hold resident (a small GPU)
            if not tokens.is_cuda or torch.cuda.is_current_stream_capturing():
                raise
            log.warning("TOKI: the persistent kernel did not launch (%s); one launch per step instead", err)
    _launch_per_step(tokens, vis, edge, a32, ws, out)
    return out


def _launch_per_step(tokens, vis, edge, a32, ws, out) -> None:
    B, L, C = tokens.shape
    T = L + 2
    M = B * T
    z, pw, n = ws[: 2 * M * C], ws[2 * M * C : -M], ws[-M:]
    tp, bc = _prep_tiles(T, C)
    _prep_kernel[(B * triton.cdiv(C, bc),)](tokens, vis, edge, z, n, L, C, TP=tp, BC=bc, num_warps=8)
    nt = triton.cdiv(C, _BN)
    steps = math.ceil(math.log2(T))  # T >= 3: at least 2
    for j in range(steps):
        last = j == steps - 1
        p = a32 if j == 0 else pw[((j + 1) % 2) * C * C :]
        grid = (triton.cdiv(M, _BM) * nt + (0 if last else nt * nt),)
        _step_kernel[grid](z[(j % 2) * M * C :], n, p, z[((j + 1) % 2) * M * C :], pw[(j % 2) * C * C :], tokens, vis,
                           out, M, T, L, 1 << j, C, LAST=last, BM=_BM, BN=_BN, BK=_BK, num_warps=_WARPS)  # fmt: skip


def _launch_fused(tokens, vis, edge, a32, ws, out, programs) -> None:
    B, L, C = tokens.shape
    device = tokens.device
    capturing = tokens.is_cuda and torch.cuda.is_current_stream_capturing()
    if programs is None and not tokens.is_cuda:
        programs = 1  # the interpreter runs programs one after another: a second would wait forever
    if programs is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        units = triton.cdiv(B * (L + 2), _BM) * triton.cdiv(C, _BN) + triton.cdiv(C, _BN) ** 2
        # Eagerly up to two programs per SM, launched as a cooperative grid: the driver refuses a grid whose
        # programs cannot all be resident at once rather than let the barrier wait forever. A graph capture
        # takes a plain launch, so there at most one per SM, which is always resident.
        programs = min(units, sms if capturing else 2 * sms)
    sync = torch.zeros(2, device=device, dtype=torch.int32)
    extra = {"launch_cooperative_grid": True} if tokens.is_cuda and not capturing else {}
    tp, bc = _prep_tiles(L + 2, C, _PREP_TILE // 2)  # 4 warps: registers for two programs per SM
    _fused_kernel[(programs,)](tokens, vis, edge, a32, ws, out, sync, B, L, C, TP=tp, BC=bc,
                               BM=_BM, BN=_BN, BK=_BK, num_warps=_WARPS, **extra)  # fmt: skip
