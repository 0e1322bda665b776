"""Bottleneck masks (True = visible) and their nearest upsampling to each stage grid."""

from mambamim.masking.masks import (
    num_visible,
    random_bottleneck_mask,
    stage_masks,
    upsample_mask,
    validate_mask,
    gather_visible,
    scatter_visible,
    gather_blocks,
    scatter_blocks,
    block_tables,
)

__all__ = ["num_visible", "random_bottleneck_mask", "upsample_mask", "stage_masks", "validate_mask", "gather_visible", "scatter_visible",
           "gather_blocks", "scatter_blocks", "block_tables"]
