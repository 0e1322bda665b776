"""Mask-aware CNN blocks: MedNeXt block and conv-norm-act, both ``forward(x, mask=None)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambamim.layers.sparse import SparseConv3d, apply_mask, make_norm, norm_over_cells

__all__ = ["MedNeXtBlock", "ConvNormAct"]


class MedNeXtBlock(nn.Module):
    """MedNeXt block: depthwise k^3 conv -> norm -> 1x1x1 expand -> GELU -> 1x1x1 compress, plus residual.

    Args:
        channels: C (in = out).
        expansion: width factor of the inner 1x1x1 layer.
        kernel_size: depthwise kernel size (odd).
        norm: ``group`` (MedNeXt default), ``instance``, ``batch`` or ``layer``.

    Shapes: (B, C, D, H, W) -> (B, C, D, H, W); ``mask`` (B, 1, D, H, W) or None.
    """

    def __init__(self, channels: int, expansion: int = 4, kernel_size: int = 3, norm: str = "group") -> None:
        super().__init__()
        if channels < 1 or expansion < 1:
            raise ValueError(f"MedNeXtBlock: channels and expansion must be >= 1, got {channels}, {expansion}")
        if kernel_size % 2 != 1:
            raise ValueError(f"MedNeXtBlock: kernel_size must be odd, got {kernel_size}")
        self.dwconv = SparseConv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = make_norm(norm, channels)
        self.expand = nn.Conv3d(channels, expansion * channels, 1)
        self.act = nn.GELU()
        self.compress = nn.Conv3d(expansion * channels, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(self.dwconv(x, mask), mask)
        y = self.compress(self.act(self.expand(y)))
        # The pointwise layers write biases at masked positions: zero them before the next spatial op.
        return apply_mask(x + y, mask)


class ConvNormAct(nn.Module):
    """k^3 conv (stride 1) -> norm -> GELU, mask-aware. (B, Cin, ...) -> (B, Cout, ...).

    ``norm=None`` gives a plain convolution with bias and no activation (the authors' widening layer).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: str | None = "group") -> None:
        super().__init__()
        self.conv = SparseConv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = make_norm(norm, out_channels) if norm is not None else None
        self.act = nn.GELU() if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x, mask)
        if self.norm is not None:
            y = self.norm(y, mask)
        return apply_mask(self.act(y), mask)

    def forward_blocks(self, blocks: torch.Tensor, batch: int) -> torch.Tensor:
        """The layer computed on visible blocks only.

        ``blocks`` (B*K, Cin, s + 2p, ...) are a sample's K visible cells with a halo of p = k // 2
        voxels of context (:func:`mambamim.masking.gather_blocks`); returns (B*K, Cout, s, s, s). The
        norm takes its statistics per sample over its K blocks, i.e. over exactly the visible voxels,
        so this equals ``forward(x, mask)`` at the visible voxels with a fraction of the work.
        """
        z = F.conv3d(blocks, self.conv.weight, self.conv.bias)  # no padding: the halo is the context
        if self.norm is None:
            return z
        return self.act(norm_over_cells(self.norm, z, batch))
