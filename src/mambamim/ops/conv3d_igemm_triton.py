"""Implicit-GEMM Triton kernels for dense 3^3 convolutions (stride 1, "same" padding) on channels-last
3D tensors with few channels (the light decoder's 48-channel full-resolution level).

cuDNN reaches about 195 TFLOP/s on the H100 for 48 -> 48 channels at 96^3 (against 380-540 for wider
layers). Experimental: these kernels are timed against cuDNN by ``benchmarks/bench_conv3d.py``.

- forward (and input gradient, as the forward of the flipped, transposed kernel): a program owns
  BLOCK_M consecutive voxels and every output channel; it loops over the 27 taps x channel chunks,
  loading the shifted rows (zero outside the volume) and multiplying them with the tap's packed
  (C_in, C_out) weight block.
- weight gradient: a program owns one tap and one chunk of voxels and reduces x_shifted^T @ dy into a
  (C_in, C_out) fp32 partial; the partials are summed by ``torch.sum`` (deterministic).
"""

from __future__ import annotations

import torch

from mambamim.ops._triton import HAS_TRITON, tl, triton

__all__ = ["conv3d_igemm_forward", "conv3d_igemm_weight_grad"]


def _pow2(n: int) -> int:
    return 1 << (max(int(n), 16) - 1).bit_length()


if HAS_TRITON:

    @triton.jit
    def _coords(m, D, H, W):
        w = m % W
        t = m // W
        h = t % H
        t = t // H
        return t % D, h, w

    # The fold: in channels-last memory the three kw taps of one (kd, kh) pair are 3 * CIN contiguous
    # values starting one voxel before the shifted centre, so the reduction runs over 9 pairs of K = 3 * CIN
    # (split into two power-of-two parts KA + KB, e.g. 144 = 128 + 16). `_fold_rows` gives the source
    # offsets of BLOCK_M voxels for pair t and the [BLOCK_M] in-volume mask of the pair's (kd, kh) shift;
    # `_fold_cols` masks the kw = -1 / +1 thirds at the volume's W edges (where the fold would wrap rows).
    @triton.jit
    def _fold_rows(m, t, M, D, H, W, CIN: tl.constexpr):
        d, h, w = _coords(m, D, H, W)
        kd = t // 3 - 1
        kh = t % 3 - 1
        dd = d + kd
        hh = h + kh
        ok = (m < M) & (dd >= 0) & (dd < D) & (hh >= 0) & (hh < H)
        src = (m + (kd * H + kh) * W - 1).to(tl.int64) * CIN
        return src, ok, w

    @triton.jit
    def _fold_cols(k, w, W, CIN: tl.constexpr):
        return ((k[None, :] >= CIN) | (w[:, None] >= 1)) & ((k[None, :] < 2 * CIN) | (w[:, None] < W - 1))

    @triton.jit
    def _fold_cols_t(k, w, W, CIN: tl.constexpr):  # _fold_cols transposed: [K, BLOCK_M]
        return ((k[:, None] >= CIN) | (w[None, :] >= 1)) & ((k[:, None] < 2 * CIN) | (w[None, :] < W - 1))

    @triton.jit(do_not_specialize=["M", "D", "H", "W"])
    def _fwd_kernel(x_ptr, w_ptr, y_ptr, M, D, H, W, CIN: tl.constexpr, COUT: tl.constexpr, NP: tl.constexpr,
                    KA: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.arange(0, NP)
        ka = tl.arange(0, KA)
        acc = tl.zeros([BLOCK_M, NP], dtype=tl.float32)
        for t in range(9):
            src, ok, w = _fold_rows(m, t, M, D, H, W, CIN)
            a = tl.load(x_ptr + src[:, None] + ka[None, :], mask=ok[:, None] & _fold_cols(ka, w, W, CIN), other=0.0)
            acc = tl.dot(a, tl.load(w_ptr + (t * 3 * CIN + ka)[:, None] * NP + n[None, :]), acc)
            if KB > 0:
                kb = KA + tl.arange(0, KB)
                b = tl.load(x_ptr + src[:, None] + kb[None, :], mask=ok[:, None] & _fold_cols(kb, w, W, CIN), other=0.0)
                acc = tl.dot(b, tl.load(w_ptr + (t * 3 * CIN + kb)[:, None] * NP + n[None, :]), acc)
        out = m.to(tl.int64)[:, None] * COUT + n[None, :]
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=(m < M)[:, None] & (n < COUT)[None, :])

    @triton.jit(do_not_specialize=["M", "D", "H", "W", "CHUNK"])
    def _wgrad_kernel(x_ptr, dy_ptr, part_ptr, M, D, H, W, CHUNK, CIN: tl.constexpr, COUT: tl.constexpr,
                      NP: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
        t = tl.program_id(0)
        chunk = tl.program_id(1)
        n = tl.arange(0, NP)
        ka = tl.arange(0, KA)
        kb = KA + tl.arange(0, KB if KB > 0 else 16)
        acc_a = tl.zeros([KA, NP], dtype=tl.float32)
        acc_b = tl.zeros([KB if KB > 0 else 16, NP], dtype=tl.float32)
        for off in range(0, CHUNK, BLOCK_M):
            m = chunk * CHUNK + off + tl.arange(0, BLOCK_M)
            src, ok, w = _fold_rows(m, t, M, D, H, W, CIN)
            g = tl.load(dy_ptr + m.to(tl.int64)[:, None] * COUT + n[None, :], mask=(m < M)[:, None] & (n < COUT)[None, :],
                        other=0.0)  # fmt: skip
            xa = tl.load(x_ptr + src[None, :] + ka[:, None], mask=ok[None, :] & _fold_cols_t(ka, w, W, CIN),
                         other=0.0)  # fmt: skip
            acc_a = tl.dot(xa, g, acc_a)
            if KB > 0:
                xb = tl.load(x_ptr + src[None, :] + kb[:, None], mask=ok[None, :] & _fold_cols_t(kb, w, W, CIN),
                             other=0.0)  # fmt: skip
                acc_b = tl.dot(xb, g, acc_b)
        base = part_ptr + (chunk * 9 + t) * (3 * CIN) * NP
        tl.store(base + ka[:, None] * NP + n[None, :], acc_a)
        if KB > 0:
            tl.store(base + kb[:, None] * NP + n[None, :], acc_b)


def _split_k(cin: int) -> tuple[int, int]:
    """3 * cin as KA + KB, both powers of two (KB may be 0), KA >= 16 and KB >= 16 where not 0."""
    k = 3 * cin
    ka = 1 << (k.bit_length() - 1)
    kb = k - ka
    if ka < 16 or (kb and (kb & (kb - 1) or kb < 16)):
        raise ValueError(f"C_in={cin}: 3 * C_in is not a sum of two powers of two >= 16")
    return ka, kb


def supported(cin: int, cout: int) -> bool:
    """Whether the kernels take this channel pair (3 * C_in splits into two powers of two, C_out <= 256)."""
    try:
        _split_k(cin)
    except ValueError:
        return False
    return 1 <= cout <= 256


def _check(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    if x.dim() != 5 or not x.is_contiguous(memory_format=torch.channels_last_3d):
        raise ValueError("the implicit-GEMM convolution needs a channels-last 5-D input")
    b, c, d, h, w = x.shape
    return b, c, d, h, w


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C_out, C_in, 3, 3, 3) -> (9, 3 * C_in, NP): per (kd, kh) pair the kw-major, C_in-minor fold, with the
    output channels zero-padded to a power of two."""
    cout, cin = weight.shape[:2]
    packed = weight.permute(2, 3, 4, 1, 0).reshape(9, 3 * cin, cout)
    return torch.nn.functional.pad(packed, (0, _pow2(cout) - cout)).to(dtype).contiguous()


def conv3d_igemm_forward(x: torch.Tensor, weight: torch.Tensor, block_m: int = 128, num_warps: int = 4,
                         num_stages: int = 3) -> torch.Tensor:  # fmt: skip
    """3^3 "same" convolution without bias. x (B, C_in, D, H, W) channels-last; weight (C_out, C_in, 3, 3, 3)."""
    b, cin, d, h, w = _check(x)
    cout = weight.shape[0]
    ka, kb = _split_k(cin)
    y = torch.empty((b, cout, d, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last_3d)
    m = b * d * h * w
    _fwd_kernel[(triton.cdiv(m, block_m),)](
        x, pack_weight(weight, x.dtype), y, m, d, h, w, CIN=cin, COUT=cout, NP=_pow2(cout), KA=ka, KB=kb,
        BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y


def conv3d_igemm_input_grad(dy: torch.Tensor, weight: torch.Tensor, **kw) -> torch.Tensor:
    """dL/dx of the "same" 3^3 convolution: the forward of the flipped kernel with C_in and C_out swapped."""
    return conv3d_igemm_forward(dy, weight.flip(2, 3, 4).transpose(0, 1), **kw)


def conv3d_igemm_weight_grad(x: torch.Tensor, dy: torch.Tensor, block_m: int = 128, chunk: int = 32768,
                             num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:  # fmt: skip
    """dL/dweight (C_out, C_in, 3, 3, 3) in fp32 from x (B, C_in, ...) and dy (B, C_out, ...), both channels-last."""
    b, cin, d, h, w = _check(x)
    cout = dy.shape[1]
    _check(dy)
    ka, kb = _split_k(cin)
    m = b * d * h * w
    chunk = max(block_m, chunk // block_m * block_m)
    nchunks = triton.cdiv(m, chunk)
    np_ = _pow2(cout)
    part = torch.empty((nchunks, 9, 3 * cin, np_), device=x.device, dtype=torch.float32)
    _wgrad_kernel[(9, nchunks)](
        x, dy, part, m, d, h, w, chunk, CIN=cin, COUT=cout, NP=np_, KA=ka, KB=kb, BLOCK_M=block_m,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return part.sum(0)[..., :cout].reshape(3, 3, 3, cin, cout).permute(4, 3, 0, 1, 2)
