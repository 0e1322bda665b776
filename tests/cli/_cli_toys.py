"""Toys for the CLI tests: a thresholding segmenter, its checkpoint info, phantom NIfTI writers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from torch import nn

from _dicom_toys import write_dicom_series  # noqa: F401  (re-exported for the CLI tests)

HU_MIN, HU_MAX = -175.0, 250.0
THRESH = 0.5  # in [0, 1] units: HU > 37.5


class ThresholdSegmenter(nn.Module):
    """Class 1 where the preprocessed intensity exceeds ``THRESH`` (HU > 37.5): pointwise, so the
    sliding window reproduces it exactly and the expected mask is known voxel by voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        d = (x[:, :1] - THRESH) * self.scale
        return torch.cat([-d, d], 1)


def toy_info(spacing=(1.0, 1.0, 1.5), roi=32):
    return {
        "model_name": "toy",
        "model_kwargs": {},
        "num_classes": 2,
        "in_channels": 1,
        "labels": {"0": "background", "1": "bright"},
        "class_names": ["background", "bright"],
        "preprocessing": {"spacing": list(spacing), "hu_min": HU_MIN, "hu_max": HU_MAX, "crop_foreground": True,
                          "min_size": [32, 32, 32], "crop_margin": 2},
        "roi_size": roi,
    }


def phantom_hu(shape, seed=0):
    """HU volume: air outside, soft tissue body, a few bright (HU 150-300) blobs."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000.0, np.float32)
    sl = tuple(slice(2, s - 2) for s in shape)
    vol[sl] = rng.normal(0.0, 15.0, size=vol[sl].shape)
    for _ in range(3):
        c = [rng.integers(3, s - 5) for s in shape]
        vol[c[0]:c[0] + 3, c[1]:c[1] + 4, c[2]:c[2] + 2] = rng.uniform(150, 300)
    return np.round(vol).astype(np.int16)


def write_nifti(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)
