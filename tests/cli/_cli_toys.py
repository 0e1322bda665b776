"""Toys for the CLI tests: a thresholding segmenter, its checkpoint info, phantom NIfTI writers."""

from __future__ import annotations

import numpy as np

from _dicom_toys import write_dicom_series  # noqa: F401  (re-exported for the CLI tests)
from _segment_toys import THRESH, ThresholdSegmenter, write_nifti  # noqa: F401  (re-exported)

HU_MIN, HU_MAX = -175.0, 250.0


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
