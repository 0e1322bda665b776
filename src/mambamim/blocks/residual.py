"""Mask-aware residual conv block: the skip refinement of HyMamba's encoder (and the authors' last
decoder stage)."""

from __future__ import annotations

import torch
from torch import nn

from mambamim.layers.sparse import SparseConv3d, apply_mask, make_norm, norm_over_cells
from mambamim.masking import gather_blocks, scatter_blocks

__all__ = ["ResidualBlock"]


class ResidualBlock(nn.Module):
    """conv k^3 -> norm -> LeakyReLU(0.01) -> conv k^3 -> norm, plus the input -> LeakyReLU(0.01).

    MONAI's ``UnetResBlock`` at stride 1 (and the authors' ``encoderK`` skip blocks), mask-aware: with a
    mask every conv output is re-zeroed at masked voxels and the norms take visible statistics, so the
    output never depends on masked input voxels. When ``in_channels != out_channels`` the residual goes
    through a 1x1x1 conv and a norm (``conv3``, ``norm3``).

    Args:
        in_channels, out_channels: C_in, C_out.
        norm: ``instance`` (MONAI's, not affine), ``layer`` (per-voxel channel LayerNorm, eps 1e-6, the
            authors'), ``group`` or ``batch``.
        bias: biases in the convolutions (MONAI: no; the authors: yes).
        kernel_size: odd kernel side.

    Shapes: (B, C_in, D, H, W) -> (B, C_out, D, H, W); ``mask`` (B, 1, D, H, W) or None.
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: str = "instance", bias: bool = False, kernel_size: int = 3
    ) -> None:  # fmt: skip
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"ResidualBlock: channels must be >= 1, got {in_channels}, {out_channels}")
        if kernel_size % 2 != 1:
            raise ValueError(f"ResidualBlock: kernel_size must be odd, got {kernel_size}")
        p = kernel_size // 2
        self.conv1 = SparseConv3d(in_channels, out_channels, kernel_size, padding=p, bias=bias)
        self.norm1 = make_norm(norm, out_channels, affine=False)
        self.conv2 = SparseConv3d(out_channels, out_channels, kernel_size, padding=p, bias=bias)
        self.norm2 = make_norm(norm, out_channels, affine=False)
        self.conv3 = self.norm3 = None
        if in_channels != out_channels:
            self.conv3 = SparseConv3d(in_channels, out_channels, 1, bias=bias)
            self.norm3 = make_norm(norm, out_channels, affine=False)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x, mask), mask))
        h = self.norm2(self.conv2(h, mask), mask)
        res = x if self.conv3 is None else self.norm3(self.conv3(x, mask), mask)
        return apply_mask(self.act(h + res), mask)

    def forward_cells(self, cells: torch.Tensor, visible: torch.Tensor, count: int) -> torch.Tensor:
        """The block on a masked volume given as its visible cells, computed on those cells only.

        ``cells`` (B*K, C_in, s, s, s) are the K visible cells per sample (the volume is zero elsewhere),
        ``visible`` the bottleneck mask (B, gd, gh, gw), ``count`` = K. Each convolution reads its
        neighbourhood through a halo gathered from the re-assembled volume, and the norms take per-sample
        statistics over the stacked cells, so this equals ``forward(volume, mask)`` on the cells.
        Returns (B*K, C_out, s, s, s).
        """
        batch = visible.shape[0]
        halo = self.conv1.kernel_size[0] // 2

        def conv_norm(conv: SparseConv3d, norm: nn.Module, z: torch.Tensor) -> torch.Tensor:
            volume = scatter_blocks(z, visible, count, like=z)
            return norm_over_cells(norm, conv.conv_valid(gather_blocks(volume, visible, count, halo=halo)), batch)

        h = self.act(conv_norm(self.conv1, self.norm1, cells))
        h = conv_norm(self.conv2, self.norm2, h)
        res = cells if self.conv3 is None else norm_over_cells(self.norm3, self.conv3.conv(cells), batch)
        return self.act(h + res)
