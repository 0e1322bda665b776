"""MambaMIM pre-training model (paper section 3, SPEC section 2).

One class pre-trains the encoder of every pre-trainable entry of the model registry
(:mod:`mambamim.models.registry`; what differs between them is data there: the default mask filling and
whether the encoder has CNN stages). Today:

- ``hymamba``: sparse MedNeXt CNN stages under bottom-up masks, the Mamba stage on visible tokens
  only, TOKI refills the masked bottleneck tokens, CNN scales are filled with one learnable token
  each, and a hierarchical light decoder with skips reconstructs the input.
- ``vim_unetr``: the Vision-Mamba encoder on visible patches, TOKI on its output sequence, the light
  decoder from 1/16 (no CNN skips exist).
- ``mednext_cnn``: HyMamba's CNN stages without Mamba (SparK as a special case): every scale,
  the bottleneck included, is filled with a learnable token (``token="toki"`` runs TOKI over the
  serialized bottleneck instead).

``forward(x, mask=None)`` returns ``{"loss", "reconstruction", "mask", "features"}``; ``reconstruction``
is in per-16^3-patch normalised units (16 = :data:`~mambamim.models.registry.PATCH_SIZE`) (what the loss compares), so it never depends on masked voxels.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambamim.masking import (
    num_visible,
    random_bottleneck_mask,
    scatter_blocks,
    stage_masks,
    validate_mask,
)
from mambamim.models.registry import create_encoder, get_entry, pretrainable_models
from mambamim.ops.conv3d import conv3d_same
from mambamim.ops.toki import TOKI, LearnableMaskToken
from mambamim.layers.scan_order import ScanOrder
from mambamim.pretrain.loss import masked_patch_mse

__all__ = ["MambaMIM", "LightDecoder", "MaskedSkip", "PRETRAINABLE"]

PRETRAINABLE = tuple(pretrainable_models())  # read from the model registry
TOKENS = ("toki", "learnable")
# Light-decoder width at 1/16 per size preset (the paper's 768 for "base").
DECODER_WIDTHS = {"base": 768, "authors": 768, "small": 384, "tiny": 32}



class MaskedSkip(NamedTuple):
    """A decoder skip given as its visible cells plus the mask token that fills the masked voxels, so
    the decoder can project it without building the filled volume (see :func:`project_masked_skip`).

    blocks: (B * count, C, s, s, s), the visible cells (:func:`mambamim.masking.gather_blocks` order);
    mask: bottleneck bool (B, gd, gh, gw); count: visible cells per sample; token: (C,); stage_mask:
    float (B, 1, D, H, W), 1 = visible.
    """

    blocks: torch.Tensor
    mask: torch.Tensor
    count: int
    token: torch.Tensor
    stage_mask: torch.Tensor


def project_masked_skip(conv: nn.Conv3d, skip: MaskedSkip) -> torch.Tensor:
    """``conv(where(visible, features, token))`` with a third of the dense work at 75 % masking.

    By linearity it is conv(token everywhere) + conv(visible * (features - token)). The second is
    assembled from every visible cell's own "full" convolution (its output reaches one kernel radius past
    the cell; overlaps add up); the first does not depend on the sample, so it is one 1-channel
    convolution of a ones volume with the kernel contracted against the token, broadcast over the batch.
    Needs a stride-1, "same"-padded, cubic, odd kernel.
    """
    k = conv.kernel_size[0]
    if conv.stride != (1, 1, 1) or conv.padding != (k // 2,) * 3 or conv.kernel_size != (k, k, k) or k % 2 != 1:
        raise ValueError("project_masked_skip needs a stride-1, same-padded convolution with a cubic odd kernel")
    p = k // 2
    token = skip.token.to(skip.blocks.dtype).view(1, -1, 1, 1, 1)
    per_cell = F.conv3d(skip.blocks - token, conv.weight, None, padding=2 * p)
    visible = scatter_blocks(per_cell, skip.mask, skip.count, halo=p, like=per_cell)
    token_kernel = (conv.weight * skip.token.to(conv.weight.dtype).view(1, -1, 1, 1, 1)).sum(1, keepdim=True)
    ones = skip.stage_mask.new_ones((1, 1, *skip.stage_mask.shape[2:]))
    everywhere = conv3d_same(ones, token_kernel, conv.bias)  # one input channel: im2col on CUDA
    return visible + everywhere.to(visible.dtype)


def _conv_norm_relu(cin: int, cout: int, norm: str) -> list[nn.Module]:
    norm_layer = nn.BatchNorm3d(cout) if norm == "batch" else nn.InstanceNorm3d(cout, affine=True)
    return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), norm_layer, nn.ReLU(inplace=True)]


class LightDecoder(nn.Module):
    """SparK-style hierarchical light decoder.

    A projection per scale (1x1x1 at the bottleneck, 3x3x3 elsewhere) to the decoder width of that
    level; from the bottleneck upward, up blocks (2x transposed conv, then two conv-norm-ReLU) and, where
    a skip is given, fusion blocks (concat the projected skip, two conv-norm-ReLU); a 1x1x1 conv to the
    output channels at full resolution.

    Args:
        bottleneck_channels: channels at 1/16.
        skip_channels: channels of the skips at 1/8, 1/4, 1/2, 1/1 (coarse to fine), or None for no skips.
        out_channels: reconstruction channels (the input's).
        width: decoder width at 1/16, halved at every level.
        num_ups: number of 2x up blocks (4 from 1/16).
        norm: ``batch`` or ``instance``.
    """

    def __init__(
        self, bottleneck_channels: int, skip_channels: Sequence[int] | None, out_channels: int, width: int = 768,
        num_ups: int = 4, norm: str = "batch",
    ) -> None:  # fmt: skip
        super().__init__()
        if norm not in ("batch", "instance"):
            raise ValueError(f"decoder norm must be 'batch' or 'instance', got {norm!r}")
        if width < 2**num_ups:
            raise ValueError(f"decoder width {width} is too small to halve {num_ups} times")
        if skip_channels is not None and len(skip_channels) != num_ups:
            raise ValueError(f"need {num_ups} skip widths (coarse to fine), got {tuple(skip_channels)}")
        widths = [width // 2**i for i in range(num_ups + 1)]
        self.proj_bottleneck = nn.Conv3d(bottleneck_channels, widths[0], 1)
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.proj_skips = nn.ModuleList()
        for i in range(num_ups):
            cin, cout = widths[i], widths[i + 1]
            self.ups.append(
                nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), *_conv_norm_relu(cout, cout, norm),
                              *_conv_norm_relu(cout, cout, norm))
            )  # fmt: skip
            if skip_channels is not None:
                self.proj_skips.append(nn.Conv3d(skip_channels[i], cout, 3, padding=1))
                self.fuse.append(nn.Sequential(*_conv_norm_relu(2 * cout, cout, norm), *_conv_norm_relu(cout, cout, norm)))
        self.head = nn.Conv3d(widths[-1], out_channels, 1)
        self.use_skips = skip_channels is not None

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor | MaskedSkip] = ()) -> torch.Tensor:
        """bottleneck (B, Cb, d, h, w); skips coarse to fine, each at twice the previous resolution
        (a tensor, or a :class:`MaskedSkip` projected without building the filled volume)."""
        h = self.proj_bottleneck(bottleneck)
        for i, up in enumerate(self.ups):
            h = up(h)
            if self.use_skips:
                skip = skips[i]
                proj = project_masked_skip(self.proj_skips[i], skip) if isinstance(skip, MaskedSkip) \
                    else self.proj_skips[i](skip)  # fmt: skip
                h = self.fuse[i](torch.cat([h, proj.to(h.dtype)], dim=1))
        return self.head(h)


class MambaMIM(nn.Module):
    """Masked image modeling pre-trainer.

    Args:
        name: a pre-trainable model of the registry (``hymamba``, ``vim_unetr``, ``mednext_cnn``).
        mask_ratio: fraction of bottleneck tokens masked (0.75).
        token: ``toki`` (state-space token interpolation) or ``learnable`` (one learnable vector); None: the
            registry entry's ``pretrain_token`` (``learnable`` for the pure CNN, else ``toki``).
        skip: use CNN skips in the decoder (encoders with CNN stages only).
        bottom_up: sparse CNN under the upsampled masks (True) or a dense CNN on the masked, zeroed input
            with only the Mamba stage dropping tokens (False, the paper's Fig. 3c; HyMamba only). Either
            way nothing depends on the voxels inside masked cells.
        scan: scan order of the Mamba stage / of TOKI.
        size: encoder preset (``base``, ``small``, ``tiny``) as in :func:`mambamim.models.create_model`.
        decoder_width: light decoder width at 1/16, halved per level (None: 768 for ``base``, 384 for
            ``small``, 32 for ``tiny``).
        decoder_norm: ``batch`` or ``instance``.
        sparse_full_res: compute the CNN's stem and full-resolution widening layer on the visible 16^3
            cells (plus the halo their kernels read) only, and the decoder's full-resolution skip
            projection from those cells and the mask token (:func:`project_masked_skip`), instead of over
            the whole volume: the same result with a quarter to a half of their work (HyMamba / CNN with
            ``bottom_up``; needs the same visible count in every sample, as random masks have).
        sparse_levels: with ``sparse_full_res``, how many encoder levels run on visible cells: 1 (full
            resolution, 16^3 cells), 2 (half resolution too, 8^3 cells) or 3 (quarter too). All are exact;
            on an H100 2 levels saved 0.75 GiB and was the fastest with CUDA graphs, but 3 ms slower
            without them (launch-bound small kernels).
        **encoder_kwargs: overrides of the encoder configuration (in_channels, widths, ...).

    The loss patch is the bottleneck cell, ``patch_size`` = the registry entry's (16).
    :meth:`mambamim.engine.config.PretrainConfig.pretrainer_spec` gives the arguments a training run uses;
    ``create_pretrainer(spec["name"], **spec["kwargs"])`` rebuilds the same module.

    Shapes: forward(x (B, C, D, H, W), mask (B, D/16, H/16, W/16) bool or None) -> dict with
    ``loss`` (scalar), ``reconstruction`` (B, C, D, H, W) in per-patch normalised units, ``mask``
    (bool, True = visible) and ``features`` (the bottleneck grid after filling).
    """

    def __init__(
        self,
        name: str = "hymamba",
        mask_ratio: float = 0.75,
        token: str | None = None,
        skip: bool = True,
        bottom_up: bool = True,
        scan: str = "raster",
        size: str = "base",
        decoder_width: int | None = None,
        decoder_norm: str = "batch",
        sparse_full_res: bool = False,
        sparse_levels: int = 1,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        entry = get_entry(name)
        if not entry.pretrainable:
            raise ValueError(f"model {name!r} cannot be pre-trained; pre-trainable models: "
                             f"{', '.join(pretrainable_models())}")  # fmt: skip
        if token is None:
            token = entry.pretrain_token
        if token not in TOKENS:
            raise ValueError(f"token must be one of {TOKENS}, got {token!r}")
        num_visible(1000, mask_ratio)  # validates the ratio
        if sparse_full_res and not (entry.cnn_stages and bottom_up):
            raise ValueError("sparse_full_res needs a CNN stage under bottom-up masking (hymamba or mednext_cnn "
                             "with bottom_up=True)")  # fmt: skip
        if isinstance(sparse_levels, bool) or not isinstance(sparse_levels, int) or not 1 <= sparse_levels <= 3:
            raise ValueError(f"sparse_levels must be 1, 2 or 3, got {sparse_levels!r}")
        self.name = name
        self.mask_ratio = float(mask_ratio)
        self.token = token
        self.bottom_up = bool(bottom_up)
        self.patch_size = entry.patch_size
        self.cnn_stages = entry.cnn_stages
        self.sparse_full_res = bool(sparse_full_res)
        self.sparse_levels = sparse_levels
        if decoder_width is None:
            decoder_width = DECODER_WIDTHS.get(size, 768)
        self.encoder: nn.Module = create_encoder(name, size, scan=scan, **encoder_kwargs)
        if not self.cnn_stages:  # a sequence encoder (Vision Mamba): no CNN skips
            self.skip = False
            skip_channels = None
            self.mask_tokens = nn.ParameterList()
        else:
            if not bottom_up and self.encoder.mamba is None:
                raise ValueError("a pure CNN has no Mamba stage to mask: bottom_up=False needs hymamba")
            self.skip = bool(skip)
            widths = self.encoder.widths
            skip_channels = list(widths[::-1]) if self.skip else None
            # One learnable token per CNN scale (full, 1/2, 1/4, 1/8).
            self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in widths)
            for t in self.mask_tokens:
                nn.init.trunc_normal_(t, std=0.02)
        self.in_channels = self.encoder.in_channels
        dim = self.encoder.out_channels
        self.fill = TOKI(dim) if token == "toki" else LearnableMaskToken(dim)
        # Only used where the bottleneck is not already a sequence (pure CNN).
        self.scan = ScanOrder(scan)
        self.decoder = LightDecoder(dim, skip_channels, self.in_channels, decoder_width, 4, decoder_norm)

    def random_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        grid = tuple(s // self.patch_size for s in x.shape[2:])
        return random_bottleneck_mask(x.shape[0], grid, self.mask_ratio, generator=generator, device=x.device)

    def _check(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % self.patch_size for s in x.shape[2:]):
            raise ValueError(f"spatial sides must be multiples of {self.patch_size}, got {tuple(x.shape[2:])}")
        grid = (x.shape[0], *(s // self.patch_size for s in x.shape[2:]))
        if mask.dtype != torch.bool or tuple(mask.shape) != grid:
            raise ValueError(f"mask must be bool {grid} (True = visible), got {mask.dtype} {tuple(mask.shape)}")

    def _fill_sequence(self, tokens: torch.Tensor, visible_seq: torch.Tensor, perm: torch.Tensor, grid) -> torch.Tensor:
        filled = self.fill(tokens, visible_seq)
        return ScanOrder.deserialize(filled, perm, grid)

    def encode(
        self, x: torch.Tensor, mask: torch.Tensor, num_visible: int | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sparse encoding. Returns (CNN skips fine to coarse, possibly empty; filled bottleneck grid)."""
        grid = tuple(mask.shape[1:])
        if not self.cnn_stages:
            out = self.encoder(x, mask, num_visible=num_visible)
            return [], self._fill_sequence(out.tokens, out.visible, out.perm, grid)
        enc = self.encoder  # a HyMambaEncoder
        enc.check_input(x)
        masks = stage_masks(mask, x.shape[2:], 5, x.dtype)
        blocks = None
        if self.bottom_up:
            if self.sparse_full_res:
                blocks = (mask, num_visible if num_visible is not None else validate_mask(mask, grid))
            feats = enc.forward_cnn(x * masks[0], masks, visible_blocks=blocks, block_levels=self.sparse_levels)
        else:
            # The paper's dense alternative (Fig. 3c): a dense CNN on the masked, zeroed input.
            feats = enc.forward_cnn(x * masks[0], None)
        skips: list[torch.Tensor | MaskedSkip] = []
        for level, (f, m, t) in enumerate(zip(feats[:4], masks[:4], self.mask_tokens)):
            if blocks is not None and level < self.sparse_levels:
                # Skips that came as visible cells stay so: their projections skip the masked cells too.
                skips.append(MaskedSkip(f, mask, blocks[1], t, m))
            else:
                skips.append(torch.where(m.bool(), f, t.to(f.dtype).view(1, -1, 1, 1, 1)))
        if enc.mamba is not None:
            out = enc.mamba(feats[4], mask, num_visible=num_visible)
            bottleneck = self._fill_sequence(out.tokens, out.visible, out.perm, grid)
        else:
            perm = self.scan.permutation(grid, x.device)
            seq = ScanOrder.serialize(feats[4], perm)
            bottleneck = self._fill_sequence(seq, mask.flatten(1)[:, perm], perm, grid)
        return skips, bottleneck

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        known = None
        if mask is None:
            mask = self.random_mask(x)
            known = num_visible(mask[0].numel(), self.mask_ratio)
        self._check(x, mask)
        skips, bottleneck = self.encode(x, mask, known)
        rec = self.decoder(bottleneck, skips[::-1] if self.skip else ())
        loss = masked_patch_mse(rec, x, mask, self.patch_size)
        return {"loss": loss, "reconstruction": rec, "mask": mask, "features": bottleneck}
