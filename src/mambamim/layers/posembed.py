"""Fixed 3D sine-cosine position embeddings for any (possibly non-cubic) token grid."""

from __future__ import annotations

import torch

__all__ = ["sincos_pos_embed_3d"]


def _axis_embed(positions: torch.Tensor, dim: int, temperature: float) -> torch.Tensor:
    """(N,) positions -> (N, dim) with dim even: [sin(p w_k), cos(p w_k)]."""
    k = torch.arange(dim // 2, dtype=torch.float64, device=positions.device)
    omega = 1.0 / temperature ** (k / max(dim // 2, 1))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_3d(
    grid: tuple[int, int, int], dim: int, temperature: float = 10000.0, device: torch.device | None = None
) -> torch.Tensor:
    """Position embedding (D*H*W, dim) in row-major grid order (float32, on ``device``).

    Each axis gets 2 * (dim // 6) channels; the ``dim % 6`` channels left over are zero. Positions are
    the integer grid indices, so a token's embedding depends on its place, not on the grid's size.
    """
    if dim < 6:
        raise ValueError(f"position embedding needs dim >= 6, got {dim}")
    d, h, w = (int(s) for s in grid)
    per_axis = 2 * (dim // 6)
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, device=device) for n in (d, h, w)), indexing="ij")
    parts = [_axis_embed(a.flatten(), per_axis, temperature) for a in (zz, yy, xx)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()
