"""TOKI's forward in Triton: the same doubling scan as :func:`mambamim.ops.toki.toki_fill`, in
``1 + ceil(log2(L + 2))`` launches instead of about 65 (eagerly, the PyTorch version is launch-bound).

- ``_prep_kernel`` (one launch): per sample, the previous and next visible position of every token of the
  padded sequence (``tl.associative_scan`` max / reverse min over the visibility row), ``n`` (distance to
  the previous visible token) and the interpolation ``s_n`` (the token itself where visible). Masked
  tokens are never loaded.
- ``_step_kernel`` (one launch per doubling step ``j``, shift ``s = 2^j``): ``z[t] += [n_t >= s] A^s z[t-s]``
  as a tiled matmul with the gate and the shift in the loads; row tiles whose gate is all off skip the
  matmul. The same launch squares ``A^s`` into ``A^(2s)`` for the next step in extra programs. The last
  step writes the output: the tokens bit-exact where visible, the filled values cast to their dtype
  elsewhere.

Matmuls run as ``tf32x3`` (three TF32 products: float32 accuracy on tensor cores). Forward only: the
caller (``toki_fill``) takes this path where no gradient is needed, and the differentiable PyTorch
version otherwise.
"""

from __future__ import annotations

import math

import torch

from mambamim.ops._triton import HAS_TRITON, tl, triton

__all__ = ["toki_fill_triton", "supports"]

_BM, _BN, _BK = 64, 64, 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_T = 4096  # the interpolation kernel holds a whole padded sequence per program
_PREP_TILE = 16384  # elements of its (sequence, channels) tile


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
    def _prep_kernel(tok_ptr, vis_ptr, edge_ptr, z_ptr, n_ptr, L, C, TP: tl.constexpr, BC: tl.constexpr):
        # Grid (B, cdiv(C, BC)). Padded position t in [0, T), T = L + 2: 0 and T - 1 are the edge tokens.
        b = tl.program_id(0)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
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
        if tl.program_id(1) == 0:
            tl.store(n_ptr + zrow, n, mask=tm)

    @triton.jit
    def _square_tile(p_ptr, p2_ptr, q, C: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # One (BN, BN) tile of P2 = P @ P.
        nt = tl.cdiv(C, BN)
        i = (q // nt) * BN + tl.arange(0, BN)
        j = (q % nt) * BN + tl.arange(0, BN)
        acc = tl.zeros((BN, BN), dtype=tl.float32)
        for k0 in range(0, C, BK):
            k = k0 + tl.arange(0, BK)
            a = tl.load(p_ptr + i[:, None] * C + k[None, :], mask=(i[:, None] < C) & (k[None, :] < C), other=0.0)
            m = tl.load(p_ptr + k[:, None] * C + j[None, :], mask=(k[:, None] < C) & (j[None, :] < C), other=0.0)
            acc += tl.dot(a, m, input_precision="tf32x3")
        tl.store(p2_ptr + i[:, None] * C + j[None, :], acc, mask=(i[:, None] < C) & (j[None, :] < C))

    @triton.jit
    def _step_kernel(z_ptr, n_ptr, p_ptr, z2_ptr, p2_ptr, tok_ptr, vis_ptr, out_ptr, M, T, L, S, C: tl.constexpr,
                     SQUARE: tl.constexpr, LAST: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
        # Grid (cdiv(M, BM) * cdiv(C, BN) [+ cdiv(C, BN)^2 squaring programs]); rows m = b * T + t.
        pid = tl.program_id(0)
        nt = tl.cdiv(C, BN)
        z_tiles = tl.cdiv(M, BM) * nt
        if SQUARE and pid >= z_tiles:
            _square_tile(p_ptr, p2_ptr, pid - z_tiles, C, BN, BK)
        else:
            m = (pid // nt) * BM + tl.arange(0, BM)
            cols = (pid % nt) * BN + tl.arange(0, BN)
            mm, cm = m < M, cols < C
            gate = mm & (tl.load(n_ptr + m, mask=mm, other=0) >= S)  # n_t >= S implies t >= S: same sample
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            if tl.max(gate.to(tl.int32), axis=0) > 0:
                src = (m - S).to(tl.int64)
                for k0 in range(0, C, BK):
                    k = k0 + tl.arange(0, BK)
                    km = k < C
                    a = tl.load(z_ptr + src[:, None] * C + k[None, :], mask=gate[:, None] & km[None, :], other=0.0)
                    pt = tl.load(p_ptr + cols[None, :] * C + k[:, None], mask=km[:, None] & cm[None, :], other=0.0)
                    acc += tl.dot(a, pt, input_precision="tf32x3")  # (z @ P^T)[m, c] = sum_k z[m, k] P[c, k]
            both = mm[:, None] & cm[None, :]
            rows = m.to(tl.int64)
            res = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=both, other=0.0) + acc
            if LAST:
                b = m // T
                t = m % T
                tok = mm & (t >= 1) & (t <= L)
                orow = b.to(tl.int64) * L + t - 1
                vis = tl.load(vis_ptr + orow, mask=tok, other=0) != 0
                om = tok[:, None] & cm[None, :]
                keep = tl.load(tok_ptr + orow[:, None] * C + cols[None, :], mask=om & vis[:, None], other=0.0)
                val = tl.where(vis[:, None], keep, res.to(out_ptr.dtype.element_ty))
                tl.store(out_ptr + orow[:, None] * C + cols[None, :], val, mask=om)
            else:
                tl.store(z2_ptr + rows[:, None] * C + cols[None, :], res, mask=both)


def toki_fill_triton(tokens: torch.Tensor, visible: torch.Tensor, A: torch.Tensor, edge_token: torch.Tensor) -> torch.Tensor:
    """:func:`mambamim.ops.toki.toki_fill` (arguments checked there) without autograd, on CUDA."""
    B, L, C = tokens.shape
    T = L + 2
    dev = tokens.device
    tokens = tokens.contiguous()
    vis = visible.contiguous().view(torch.uint8)
    z = torch.empty((2, B * T, C), device=dev, dtype=torch.float32)
    n = torch.empty(B * T, device=dev, dtype=torch.int32)
    out = torch.empty_like(tokens)
    tp = triton.next_power_of_2(T)
    bc = min(64, triton.next_power_of_2(C), max(1, _PREP_TILE // tp))
    _prep_kernel[(B, triton.cdiv(C, bc))](tokens, vis, edge_token.detach().contiguous(), z[0], n, L, C,
                                         TP=tp, BC=bc, num_warps=8)  # fmt: skip
    steps = math.ceil(math.log2(T))  # T >= 3: at least 2
    a32 = A.detach().to(torch.float32).contiguous()
    squares = (torch.empty_like(a32), torch.empty_like(a32))  # A^(2^j), alternating: step j reads one, fills the other
    nt = triton.cdiv(C, _BN)
    for j in range(steps):
        last = j == steps - 1
        p = a32 if j == 0 else squares[(j - 1) % 2]
        p2 = squares[j % 2]
        grid = (triton.cdiv(B * T, _BM) * nt + (0 if last else nt * nt),)
        _step_kernel[grid](z[j % 2], n, p, z[(j + 1) % 2], p2, tokens, vis, out, B * T, T, L, 1 << j, C=C,
                           SQUARE=not last, LAST=last, BM=_BM, BN=_BN, BK=_BK, num_warps=4)  # fmt: skip
    return out
