"""Mask-aware ("sparse") layers for masked pre-training of CNN stages.

Every layer takes ``forward(x, mask=None)``. ``mask`` is a float 0/1 tensor (B, 1, D, H, W) at the
layer's *output* grid, 1 = visible; ``None`` runs the layer densely, so the same weights serve
pre-training and fine-tuning. Rules that make the encoder blind to masked input voxels:

- spatial ops (conv with kernel > 1, pooling) read only zeros at masked positions because every layer
  re-zeroes its output there;
- normalisation statistics are computed over visible positions only;
- pointwise ops may write at masked positions (a bias), which the block re-zeroes before the next
  spatial op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambamim.ops.conv3d import conv3d_same, conv3d_valid

__all__ = [
    "apply_mask",
    "SparseConv3d",
    "SparseMaxPool3d",
    "SparseBatchNorm3d",
    "SparseGroupNorm",
    "SparseInstanceNorm3d",
    "SparseLayerNorm3d",
    "NORMS",
    "make_norm",
    "channels_last_instance_norms",
    "norm_over_cells",
]


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero ``x`` (B, C, ...) where ``mask`` (B, 1, ...) is 0; identity for ``mask=None``."""
    return x if mask is None else x * mask.to(x.dtype)


class SparseConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose output is re-zeroed at masked positions.

    On CUDA, two stride-1 "same" convolutions take faster exact paths (:mod:`mambamim.ops.conv3d`):
    depthwise ones run fused Triton kernels, and ones with at most 32 = C_in * k^3 inputs per output
    (the 1-channel stem) run as one GEMM over shifted copies.
    """

    def _is_same_stride1(self) -> bool:
        k = self.kernel_size[0]
        return (
            self.padding_mode == "zeros"
            and k % 2 == 1
            and self.kernel_size == (k, k, k)
            and self.stride == (1, 1, 1)
            and self.dilation == (1, 1, 1)
            and self.padding == (k // 2,) * 3
        )

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self._is_same_stride1():
            return conv3d_same(x, self.weight, self.bias, self.groups)
        return super().forward(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return apply_mask(self.conv(x), mask)

    def conv_valid(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution without padding (each side shrinks by k - 1): for blocks that carry their own
        context (:func:`mambamim.masking.gather_blocks` with a halo); the same fast paths as ``conv``."""
        if not self._is_same_stride1():
            raise ValueError("conv_valid needs a stride-1, same-padded convolution with a cubic odd kernel")
        return conv3d_valid(x, self.weight, self.bias, self.groups)


class SparseMaxPool3d(nn.MaxPool3d):
    """Max pooling; ``mask`` is the mask at the pooled grid.

    With masks that are nearest upsamplings of one coarse mask, a visible output cell only covers
    visible input cells, so no masked value can win the max.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return apply_mask(super().forward(x), mask)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 for statistics; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_moments(x: torch.Tensor, mask: torch.Tensor | None, dims: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Mean and biased variance of x over ``dims`` counting only mask == 1 positions (all with ``mask=None``;
    at least float32)."""
    xf = _upcast(x)
    if mask is None:
        var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)
        return mean, var, None
    m = mask.to(xf.dtype).expand_as(xf)
    count = m.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mean = (xf * m).sum(dim=dims, keepdim=True) / count
    var = (((xf - mean) * m) ** 2).sum(dim=dims, keepdim=True) / count
    return mean, var, count


class SparseBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d with batch statistics over visible positions only (running stats updated from them)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if mask is None or not (self.training or not self.track_running_stats):
            return apply_mask(super().forward(x), mask)
        mean, var, count = _masked_moments(x, mask, (0, 2, 3, 4))
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = count.flatten()[0]
                unbiased = var.flatten() * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - momentum).add_(mean.flatten(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        y = (_upcast(x) - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)
        return apply_mask(y.to(x.dtype), mask)


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm whose per-sample, per-group statistics use visible positions only."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        b, c = x.shape[:2]
        g = self.num_groups
        if mask is None and (g != c or not torch.compiler.is_compiling()):
            # Eager and dense: ATen's fused kernel, the fastest there (7x the op-by-op form on a CPU), and it
            # keeps only x and the statistics for the backward pass (with the op-by-op form, an eager fp32
            # fine-tuning step peaked at 60.8 GiB on an H100, against 45.9 GiB with F.group_norm).
            return super().forward(x)
        if g == c:
            # One group per channel, masked or compiled: reduce over the spatial dims without a reshape, which
            # keeps a channels_last_3d input channels-last. Compiled, F.group_norm's reshape became layout
            # copies around every convolution (42 ms of cuDNN transposes and a 12 ms copy kernel in the
            # fine-tuning step on an H100).
            mean, var, _ = _masked_moments(x, mask, tuple(range(2, x.dim())))
            y = (_upcast(x) - mean) * torch.rsqrt(var + self.eps)
            if self.affine:
                shape = (1, c) + (1,) * (x.dim() - 2)
                y = y * self.weight.view(shape) + self.bias.view(shape)
            return apply_mask(y.to(x.dtype), mask)
        xg = x.reshape(b, g, c // g, -1)
        mean, var, _ = _masked_moments(xg, mask.reshape(b, 1, 1, -1), (2, 3))
        y = ((_upcast(xg) - mean) * torch.rsqrt(var + self.eps)).reshape_as(x)
        if self.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return apply_mask(y.to(x.dtype), mask)


class SparseInstanceNorm3d(SparseGroupNorm):
    """Instance norm (one group per channel), affine by default, statistics over visible positions."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_channels, num_channels, eps=eps, affine=affine)


class SparseLayerNorm3d(nn.Module):
    """LayerNorm over channels at every voxel of a channels-first volume; output re-masked."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps).movedim(-1, 1)
        return apply_mask(y, mask)


def channels_last_instance_norms(module: nn.Module) -> nn.Module:
    """Replace every ``nn.InstanceNorm3d`` without running statistics inside ``module`` (MONAI's UNETR blocks
    build them) by :class:`SparseInstanceNorm3d` with the same ``eps`` and ``affine``: the same function and
    state-dict keys, computed without the reshape that turns channels-last activations into layout copies.
    Returns ``module``, changed in place. Networks expose it as their ``channels_last_norms`` constructor option
    (on by default); call it directly only on MONAI blocks built outside them."""
    for name, child in module.named_children():
        if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
            norm = SparseInstanceNorm3d(child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                norm.to(child.weight).load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            channels_last_instance_norms(child)
    return module


NORMS = ("group", "instance", "batch", "layer")


def norm_over_cells(norm: nn.Module, cells: torch.Tensor, batch: int) -> torch.Tensor:
    """Apply a sparse-aware ``norm`` to visible cells as if to the masked volume they come from.

    ``cells`` (B*K, C, s, s, s) are each sample's K visible cells (:func:`mambamim.masking.gather_blocks`
    order). A sample's K cells are stacked along depth into one dense (B, C, K*s, s, s) volume (a view when
    channels-last), so per-sample statistics (group / instance), batch statistics and per-voxel norms all
    see exactly the visible voxels. Returns (B*K, C, s, s, s) in ``cells``' dtype.
    """
    n, c, s = cells.shape[0], cells.shape[1], cells.shape[2]
    if n % batch:
        raise ValueError(f"{n} cells do not split into {batch} samples")
    k = n // batch
    stacked = cells.reshape(batch, k, c, s, s, s).transpose(1, 2).reshape(batch, c, k * s, s, s)
    y = norm(stacked, None).to(cells.dtype)
    return y.reshape(batch, c, k, s, s, s).transpose(1, 2).reshape(n, c, s, s, s)


def make_norm(kind: str, channels: int, affine: bool = True) -> nn.Module:
    """Sparse-aware norm by name: ``group`` (MedNeXt's default: one group per channel, affine),
    ``instance`` (same statistics), ``batch`` or ``layer`` (per-voxel over channels, eps 1e-6).
    ``affine=False`` is honoured by ``instance`` only (MONAI's default instance norm)."""
    if kind == "group":
        return SparseGroupNorm(channels, channels)
    if kind == "instance":
        return SparseInstanceNorm3d(channels, affine=affine)
    if kind == "batch":
        return SparseBatchNorm3d(channels)
    if kind == "layer":
        return SparseLayerNorm3d(channels)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")
