"""Vanilla Mamba: UNETR with its ViT replaced by a Vision-Mamba encoder (paper section 3.1).

Patch size 16 (:data:`~mambamim.models.registry.PATCH_SIZE`), 12 layers of width 768; the UNETR decoder taps layers 3, 6, 9 and 12. The Vision-Mamba
layers have no MLP (as in Vision Mamba; ``mlp_ratio`` can add one).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from mambamim.blocks.vim import MambaStage
from mambamim.layers.scan_order import ScanOrder
from mambamim.layers.sparse import channels_last_instance_norms
from mambamim.models.registry import PATCH_SIZE

__all__ = ["VimEncoder", "VimUNETR"]


class VimEncoder(nn.Module):
    """Patch embedding (``patch_size``^3 = 16^3, stride 16) + Vision-Mamba stage.

    forward(x, visible=None, return_layers=()) -> :class:`~mambamim.blocks.vim.StageOutput` over the
    (D/16, H/16, W/16) token grid (16 = :data:`~mambamim.models.registry.PATCH_SIZE`). Patches do not overlap, so a masked patch's voxels never reach a
    visible token.
    """

    def __init__(
        self, in_channels: int = 1, dim: int = 768, depth: int = 12, patch_size: int = PATCH_SIZE, mlp_ratio: float = 0.0,
        scan: str = "raster", bidirectional: bool = True, d_state: int = 16,
    ) -> None:  # fmt: skip
        super().__init__()
        if patch_size != PATCH_SIZE:
            raise ValueError(f"VimEncoder: the masking grid is input/{PATCH_SIZE}, so patch_size must be {PATCH_SIZE}")
        self.in_channels = in_channels
        self.out_channels = dim
        self.depth = depth
        self.patch_embed = nn.Conv3d(in_channels, dim, patch_size, stride=patch_size)
        self.mamba = MambaStage(dim, depth, mlp_ratio, scan, bidirectional, d_state=d_state)

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor | None = None, return_layers: Sequence[int] = (),
        num_visible: int | None = None,
    ):
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % PATCH_SIZE for s in x.shape[2:]):
            raise ValueError(f"spatial sides must be multiples of {PATCH_SIZE}, got {tuple(x.shape[2:])}")
        return self.mamba(self.patch_embed(x), visible, return_layers, num_visible)


class VimUNETR(nn.Module):
    """UNETR decoder over a Vision-Mamba encoder. forward(x) -> logits (B, num_classes, D, H, W).

    ``channels_last_norms`` computes the UNETR blocks' instance norms as
    :class:`~mambamim.layers.sparse.SparseInstanceNorm3d` (same function and state-dict keys, no layout copies
    of channels-last activations); False keeps MONAI's ``nn.InstanceNorm3d``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 14, dim: int = 768, depth: int = 12, feature_size: int = 16,
        mlp_ratio: float = 0.0, scan: str = "raster", bidirectional: bool = True, d_state: int = 16,
        norm_name: str = "instance", channels_last_norms: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        if depth < 4:
            raise ValueError(f"VimUNETR taps four layers, so depth must be >= 4, got {depth}")
        self.encoder = VimEncoder(in_channels, dim, depth, PATCH_SIZE, mlp_ratio, scan, bidirectional, d_state)
        # Evenly spaced taps: layers 3, 6, 9 for depth 12; the fourth is the (normed) encoder output.
        self.taps = tuple(round(depth * k / 4) for k in (1, 2, 3))
        fs = feature_size
        self.encoder1 = UnetrBasicBlock(3, in_channels, fs, 3, 1, norm_name, res_block=True)
        self.encoder2 = UnetrPrUpBlock(3, dim, fs * 2, 2, 3, 1, 2, norm_name, conv_block=True, res_block=True)
        self.encoder3 = UnetrPrUpBlock(3, dim, fs * 4, 1, 3, 1, 2, norm_name, conv_block=True, res_block=True)
        self.encoder4 = UnetrPrUpBlock(3, dim, fs * 8, 0, 3, 1, 2, norm_name, conv_block=True, res_block=True)
        self.decoder5 = UnetrUpBlock(3, dim, fs * 8, 3, 2, norm_name, res_block=True)
        self.decoder4 = UnetrUpBlock(3, fs * 8, fs * 4, 3, 2, norm_name, res_block=True)
        self.decoder3 = UnetrUpBlock(3, fs * 4, fs * 2, 3, 2, norm_name, res_block=True)
        self.decoder2 = UnetrUpBlock(3, fs * 2, fs, 3, 2, norm_name, res_block=True)
        self.head = UnetOutBlock(3, fs, num_classes)
        if channels_last_norms:
            channels_last_instance_norms(self)  # MONAI's blocks build nn.InstanceNorm3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x, None, self.taps)
        grid = tuple(s // PATCH_SIZE for s in x.shape[2:])
        z3, z6, z9, z12 = (ScanOrder.deserialize(h, out.perm, grid) for h in (*out.hidden, out.tokens))
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(z3)
        enc3 = self.encoder3(z6)
        enc4 = self.encoder4(z9)
        d = self.decoder5(z12, enc4)
        d = self.decoder4(d, enc3)
        d = self.decoder3(d, enc2)
        d = self.decoder2(d, enc1)
        return self.head(d)
