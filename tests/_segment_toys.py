"""Toys shared by the inference, API and CLI tests: a thresholding segmenter and a NIfTI writer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from torch import nn

THRESH = 0.5  # in [0, 1] units after the [-175, 250] HU window: HU > 37.5


class ThresholdSegmenter(nn.Module):
    """Class 1 where the preprocessed intensity exceeds ``THRESH`` (HU > 37.5): pointwise, so the
    sliding window reproduces it exactly and the expected label map is known voxel by voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        d = (x[:, :1] - THRESH) * self.scale
        return torch.cat([-d, d], 1)


def write_nifti(path, data: np.ndarray, affine: np.ndarray) -> str:
    """Save ``data`` with ``affine`` as both qform and sform; returns the path."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)
