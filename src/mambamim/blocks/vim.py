"""Vision-Mamba layers and the Mamba stage that runs them on a serialized token grid."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from mambamim.layers.mamba import MambaMixer
from mambamim.masking import gather_visible, scatter_visible
from mambamim.layers.posembed import sincos_pos_embed_3d
from mambamim.layers.scan_order import ScanOrder

__all__ = ["VimLayer", "MambaStage", "StageOutput"]


class VimLayer(nn.Module):
    """LayerNorm -> Mamba mixer -> residual; then LayerNorm -> MLP -> residual (skipped if mlp_ratio = 0).

    Shapes: (B, L, C) -> (B, L, C).
    """

    def __init__(
        self, dim: int, mlp_ratio: float = 2.0, bidirectional: bool = True, d_state: int = 16, d_conv: int = 4,
        expand: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        if mlp_ratio < 0:
            raise ValueError(f"VimLayer: mlp_ratio must be >= 0, got {mlp_ratio}")
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = MambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional)
        if mlp_ratio > 0:
            hidden = int(dim * mlp_ratio)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        else:
            self.norm2 = None
            self.mlp = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class StageOutput(NamedTuple):
    """What :class:`MambaStage` returns.

    tokens: (B, L, C) in scan order; zeros at masked positions when a mask was given.
    visible: (B, L) bool in scan order, or None for a dense run.
    perm: (L,) scan permutation (``tokens[:, i]`` is grid cell ``perm[i]``).
    hidden: outputs of the requested layers, each (B, L, C) in scan order (masked positions zero).
    """

    tokens: torch.Tensor
    visible: torch.Tensor | None
    perm: torch.Tensor
    hidden: list[torch.Tensor]


class MambaStage(nn.Module):
    """A stack of Vision-Mamba layers over a 3D token grid, optionally on the visible tokens only.

    The grid is serialized in the chosen scan order; a fixed 3D sin-cos position embedding of each
    token's true grid position is added before the first layer; with a mask, only visible tokens
    (in scan order) enter the layers.

    Args:
        dim: token width C.
        depth: number of layers.
        mlp_ratio: MLP width factor per layer (0: no MLP, as in the original Vision Mamba).
        scan: ``raster``, ``zigzag``, ``hilbert`` or ``shuffle``.
        bidirectional: bidirectional mixers (Vision Mamba v2).
        final_norm: LayerNorm on the output.
    """

    def __init__(
        self, dim: int, depth: int, mlp_ratio: float = 2.0, scan: str = "raster", bidirectional: bool = True,
        final_norm: bool = True, d_state: int = 16, d_conv: int = 4, expand: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        if depth < 1:
            raise ValueError(f"MambaStage: depth must be >= 1, got {depth}")
        self.dim = dim
        self.scan = ScanOrder(scan)
        self.layers = nn.ModuleList(
            VimLayer(dim, mlp_ratio, bidirectional, d_state=d_state, d_conv=d_conv, expand=expand)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        # Per-instance cache of the position embedding for the last grid / device / dtype seen.
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def _pos_embed(self, grid: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (grid, device, dtype)
        if torch.compiler.is_compiling():
            # No cache inside a graph (see ScanOrder.permutation): a few fused elementwise ops on the device.
            return sincos_pos_embed_3d(grid, self.dim, device=device).to(dtype)
        if key not in self._pos_cache:
            self._pos_cache = {key: sincos_pos_embed_3d(grid, self.dim).to(device=device, dtype=dtype)}
        return self._pos_cache[key]

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor | None = None, return_layers: Sequence[int] = (),
        num_visible: int | None = None,
    ) -> StageOutput:
        """x (B, C, D, H, W); visible (B, D, H, W) bool or None; return_layers: 1-based layer indices.

        ``num_visible``: visible tokens per sample when the caller knows it (saves a device sync and
        is then not re-checked); otherwise it is counted and checked to be equal across the batch.
        """
        if x.dim() != 5 or x.shape[1] != self.dim:
            raise ValueError(f"MambaStage expects (B, {self.dim}, D, H, W), got {tuple(x.shape)}")
        grid = tuple(x.shape[2:])
        if visible is not None and tuple(visible.shape) != (x.shape[0], *grid):
            raise ValueError(f"mask {tuple(visible.shape)} does not match the token grid {(x.shape[0], *grid)}")
        perm = self.scan.permutation(grid, x.device)
        pos = self._pos_embed(grid, x.device, x.dtype)
        seq = ScanOrder.serialize(x, perm) + pos[perm]
        vis_seq = None
        if visible is not None:
            vis_seq = visible.flatten(1)[:, perm]
            if num_visible is None:
                counts = vis_seq.sum(dim=1).tolist()
                if len(set(counts)) != 1 or counts[0] == 0:
                    raise ValueError(f"every sample needs the same, non-zero number of visible tokens, got {counts}")
                num_visible = counts[0]
            seq = gather_visible(seq, vis_seq, num_visible)
        hidden = []
        for i, layer in enumerate(self.layers, start=1):
            seq = layer(seq)
            if i in return_layers:
                hidden.append(seq if vis_seq is None else scatter_visible(seq, vis_seq))
        seq = self.norm(seq)
        if vis_seq is not None:
            seq = scatter_visible(seq, vis_seq)
        return StageOutput(seq, vis_seq, perm, hidden)
