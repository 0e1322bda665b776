"""HyMamba: a MedNeXt CNN encoder (four resolution stages, max-pool downsampling) followed by a
Vision-Mamba stage at 1/16 resolution, with a UNETR-style segmentation decoder (paper section 3.1).

Reference configuration (SPEC section 1): stem 3^3 conv 1->32; 3^3 conv to 64 (full-resolution skip);
pool, 2 MedNeXt blocks at 64 (expansion 2), widen to 128 (1/2 skip); pool, 2 blocks at 128 (exp. 4),
widen to 192 (1/4 skip); pool, 2 blocks at 192 (exp. 4), widen to 384 (1/8 skip); pool, 1 block at
384 (exp. 4); 4 Vision-Mamba layers of width 384 (MLP ratio 2). Each skip is refined by a residual
conv block; the decoder goes back up with transposed-conv up blocks and a 1x1x1 head.

Size: 41.7 M parameters for 1 input channel and 14 classes (22.6 M of them in the encoder, the skip
blocks included); the authors' fine-tuning network counts 41.8 M (22.7 M encoder), and the ``authors``
preset rebuilds it tensor for tensor (:data:`mambamim.models.MODEL_PRESETS`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrUpBlock
from torch import nn

from mambamim.blocks.mednext import ConvNormAct, MedNeXtBlock
from mambamim.blocks.residual import ResidualBlock
from mambamim.blocks.vim import MambaStage
from mambamim.layers.scan_order import ScanOrder
from mambamim.layers.sparse import SparseConv3d, SparseMaxPool3d, apply_mask, channels_last_instance_norms
from mambamim.masking import gather_blocks, scatter_blocks, stage_masks
from mambamim.models.registry import PATCH_SIZE

__all__ = ["HyMambaEncoder", "HyMamba"]


WIDEN_LAYERS = ("conv_norm_act", "conv")


class HyMambaEncoder(nn.Module):
    """CNN stages, skip blocks and (optional) Mamba stage. Everything here is what pre-training trains
    and what fine-tuning loads.

    ``forward(x, visible=None)`` returns the skip features [L0 (full), L1 (1/2), L2 (1/4), L3 (1/8)],
    each the widening layer's output refined by its residual skip block (``skip_blocks``), and the 1/16
    output L4 (B, C, d, h, w): the feature maps the segmentation decoder consumes, finest first. With
    ``visible`` (B, D/16, H/16, W/16) bool, the CNN runs sparse under the upsampled masks and the Mamba stage sees only visible tokens (masked tokens are
    zero in its output); use :meth:`forward_features` to get the Mamba stage's sequence output.

    Args:
        in_channels: image channels.
        stem_channels: width of the full-resolution stem.
        widths: channels of the four skips (full, 1/2, 1/4, 1/8); the 1/16 stage keeps widths[-1].
        depths: MedNeXt blocks at 1/2, 1/4, 1/8 and 1/16.
        expansions: MedNeXt expansion factors at the same four resolutions.
        mamba_depth: Vision-Mamba layers at 1/16 (0 = pure CNN encoder, SparK's setting).
        mlp_ratio: MLP ratio of the Mamba layers.
        scan: scan order of the Mamba stage.
        norm: norm of the CNN blocks.
        bidirectional: bidirectional Mamba mixers.
        d_state: SSM state size of the mixers.
        widen: ``conv_norm_act`` (conv k3 -> norm -> GELU, ours) or ``conv`` (a plain conv k3 with bias, the
            authors').
        skip_norm: norm of the skip blocks (``instance``: MONAI's UNETR block; ``layer``: the authors').
        skip_bias: biases in the skip blocks' convolutions.
        final_norm: LayerNorm after the Mamba stage (the authors' network has none).
    """

    num_levels = 4

    def __init__(
        self,
        in_channels: int = 1,
        stem_channels: int = 32,
        widths: Sequence[int] = (64, 128, 192, 384),
        depths: Sequence[int] = (2, 2, 2, 1),
        expansions: Sequence[int] = (2, 4, 4, 4),
        mamba_depth: int = 4,
        mlp_ratio: float = 2.0,
        scan: str = "raster",
        norm: str = "group",
        bidirectional: bool = True,
        d_state: int = 16,
        widen: str = "conv_norm_act",
        skip_norm: str = "instance",
        skip_bias: bool = False,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        if widen not in WIDEN_LAYERS:
            raise ValueError(f"widen must be one of {WIDEN_LAYERS}, got {widen!r}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        for name, seq in (("widths", widths), ("depths", depths), ("expansions", expansions)):
            if len(seq) != 4:
                raise ValueError(f"{name} needs 4 entries (full, 1/2, 1/4, 1/8 / 1/16 stages), got {tuple(seq)}")
        if min(widths) < 1 or min(expansions) < 1 or min(depths) < 0 or mamba_depth < 0:
            raise ValueError("widths and expansions must be >= 1, depths and mamba_depth >= 0")
        self.in_channels = in_channels
        self.widths = tuple(int(w) for w in widths)
        self.out_channels = self.widths[-1]
        self.stem = SparseConv3d(in_channels, stem_channels, 3, padding=1)
        widen_norm = norm if widen == "conv_norm_act" else None
        self.widen = nn.ModuleList([ConvNormAct(stem_channels, widths[0], norm=widen_norm)])
        self.pool = SparseMaxPool3d(2)
        self.stages = nn.ModuleList()
        for level in range(4):
            ch = widths[level]
            self.stages.append(nn.ModuleList(MedNeXtBlock(ch, expansions[level], norm=norm) for _ in range(depths[level])))
            if level < 3:
                self.widen.append(ConvNormAct(ch, widths[level + 1], norm=widen_norm))
        self.skip_blocks = nn.ModuleList(ResidualBlock(c, c, norm=skip_norm, bias=skip_bias) for c in self.widths)
        self.mamba = (
            MambaStage(widths[-1], mamba_depth, mlp_ratio, scan, bidirectional, final_norm=final_norm,
                       d_state=d_state)
            if mamba_depth > 0
            else None
        )  # fmt: skip

    def forward_cnn(
        self,
        x: torch.Tensor,
        masks: Sequence[torch.Tensor | None] | None = None,
        visible_blocks: tuple[torch.Tensor, int] | None = None,
        block_levels: int = 1,
    ) -> list[torch.Tensor]:
        """CNN stages and skip blocks. masks: float (B, 1, ...) per level 0..4 or None (dense). Returns
        L0..L3 (skip-block outputs) and f4 (the input of the Mamba stage).

        ``visible_blocks = (bottleneck mask, visible count per sample)`` (with ``masks``) computes the
        stem, the widening layer and the pooling of the first ``block_levels`` levels (1: the full
        resolution only; up to 3) on the visible cells only, each gathered with the halo of context its
        kernels read: the same result (masked voxels are zero either way) with about a quarter of their
        convolution work. Those levels' features then come as the cells, (B * count, C, s, s, s) with
        s = 16 at full resolution (8 at half, 4 at quarter), in the order of
        :func:`mambamim.masking.gather_blocks`; they are never built as whole volumes.
        """
        if not 1 <= block_levels <= 3:
            raise ValueError(f"block_levels must be 1, 2 or 3, got {block_levels}")
        if masks is None:
            masks = [None] * 5
        sparse = visible_blocks is not None and masks[0] is not None
        feats = []
        h = x
        for level in range(5):
            if level > 0:
                for block in self.stages[level - 1]:
                    h = block(h, masks[level])
            if level == 4:
                feats.append(h)
                break
            widen = self.widen[level]
            if sparse and level < block_levels:
                visible, count = visible_blocks
                halo = widen.conv.kernel_size[0] // 2
                if level == 0:
                    # The stem on each visible cell and the halo the widening conv reads: x with the stem's
                    # context too, re-masked as the whole-volume stem is (zeros in masked cells and outside).
                    xb = gather_blocks(x, visible, count, halo=halo + self.stem.kernel_size[0] // 2)
                    hb = apply_mask(self.stem.conv_valid(xb), gather_blocks(masks[0], visible, count, halo=halo))
                else:
                    hb = gather_blocks(h, visible, count, halo=halo)  # h is zero in masked cells already
                f = widen.forward_blocks(hb, x.shape[0])
                # pooling windows never straddle cells, so pooling the blocks is pooling the volume
                h = scatter_blocks(self.pool(f), visible, count, like=h)
            else:
                f = widen(self.stem(h, masks[0]) if level == 0 else h, masks[level])
                h = self.pool(f, masks[level + 1])
            feats.append(f)
        return self._refine_skips(feats, masks, visible_blocks if sparse else None, block_levels)

    def _refine_skips(
        self, feats: list[torch.Tensor], masks: Sequence[torch.Tensor | None], visible_blocks, block_levels: int
    ) -> list[torch.Tensor]:
        out = []
        for level, (f, block) in enumerate(zip(feats[:4], self.skip_blocks)):
            if visible_blocks is not None and level < block_levels:
                out.append(block.forward_cells(f, *visible_blocks))
            else:
                out.append(block(f, masks[level]))
        return out + feats[4:]

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % PATCH_SIZE for s in x.shape[2:]):
            raise ValueError(f"spatial sides must be multiples of {PATCH_SIZE}, got {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> list[torch.Tensor]:
        self.check_input(x)
        masks = None if visible is None else stage_masks(visible, x.shape[2:], 5, x.dtype)
        if masks is not None:
            x = x * masks[0]
        feats = self.forward_cnn(x, masks)
        if self.mamba is not None:
            out = self.mamba(feats[4], visible)
            feats[4] = ScanOrder.deserialize(out.tokens, out.perm, tuple(feats[4].shape[2:]))
        return feats


class HyMamba(nn.Module):
    """HyMamba segmentation network. forward(x (B, C_in, D, H, W)) -> logits (B, num_classes, D, H, W);
    sides must be multiples of :data:`~mambamim.models.registry.PATCH_SIZE` (non-cubic is fine).

    The encoder (:class:`HyMambaEncoder`, skip blocks included) is what pre-training trains; the decoder is
    trained fresh: MONAI UNETR up blocks from 1/16 to full resolution, optionally a residual block to
    ``final_channels`` (the authors' 64 -> 32 stage: channel LayerNorm, biases, 1x1x1 projection on the
    residual), and a 1x1x1 head.

    Args:
        num_classes: output channels of the head.
        decoder_norm: MONAI norm name of the up blocks.
        final_channels: None: the head reads the full-resolution map (widths[0] channels).
        channels_last_norms: compute the up blocks' instance norms as
            :class:`~mambamim.layers.sparse.SparseInstanceNorm3d` (same function and state-dict keys, no layout
            copies of channels-last activations); False keeps MONAI's ``nn.InstanceNorm3d``.
        **encoder_kwargs: the encoder's arguments (in_channels, widths, scan, ...), see :class:`HyMambaEncoder`.
    """

    def __init__(
        self,
        num_classes: int = 14,
        decoder_norm: str = "instance",
        final_channels: int | None = None,
        channels_last_norms: bool = True,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if final_channels is not None and final_channels < 1:
            raise ValueError(f"final_channels must be >= 1 or None, got {final_channels}")
        self.encoder = HyMambaEncoder(**encoder_kwargs)
        w = self.encoder.widths
        ups = []
        in_ch = w[-1]
        for level in (3, 2, 1, 0):
            ups.append(
                UnetrUpBlock(3, in_ch, w[level], kernel_size=3, upsample_kernel_size=2, norm_name=decoder_norm,
                             res_block=True)
            )  # fmt: skip
            in_ch = w[level]
        self.up_blocks = nn.ModuleList(ups)
        self.final_block = None
        if final_channels is not None:
            self.final_block = ResidualBlock(w[0], final_channels, norm="layer", bias=True)
        self.head = UnetOutBlock(3, final_channels or w[0], num_classes)
        if channels_last_norms:
            channels_last_instance_norms(self)  # MONAI's blocks build nn.InstanceNorm3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        h = feats[4]
        for up, level in zip(self.up_blocks, (3, 2, 1, 0)):
            h = up(h, feats[level])
        if self.final_block is not None:
            h = self.final_block(h)
        return self.head(h)
