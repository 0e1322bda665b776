"""Tiny NIfTI / DICOM / nnU-Net / Decathlon fixtures for the data tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _dicom_toys import write_dicom_series

REAL_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct_abdomen_3mm"

# A few voxel->RAS affines (anisotropic spacing): RAS, LPS, and a permuted P-L-S one.
AFFINES = {
    "RAS": np.array([[1.5, 0, 0, -20.0], [0, 1.0, 0, 10.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]]),
    "LPS": np.array([[-1.5, 0, 0, 30.0], [0, -1.0, 0, 40.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]]),
    "PLS": np.array([[0, -1.0, 0, 12.0], [-1.5, 0, 0, 3.0], [0, 0, 2.0, 1.0], [0, 0, 0, 1]]),
}


def phantom(shape=(24, 20, 16), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(image HU int16, label uint8): an ellipsoid body of soft tissue in air with two box organs."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.75) ** 2 + (y / 0.7) ** 2 + (z / 1.3) ** 2 < 1
    img = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    lab = np.zeros(shape, np.uint8)
    sx, sy, sz = shape
    lab[sx // 4: sx // 2, sy // 3: sy // 2 + 1, sz // 4: sz // 2] = 1
    lab[sx // 2: sx // 2 + 4, sy // 2: sy // 2 + 3, sz // 2: sz // 2 + 3] = 2
    img[lab == 1] = 60
    img[lab == 2] = 150
    return img.astype(np.int16), lab


def write_nifti(path, data, affine) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)), path)
    return path


@pytest.fixture
def real_ct():
    if not (REAL_CT / "image.nii.gz").is_file():
        pytest.skip("real CT sample (../shared/data/ct_abdomen_3mm) not present")
    return REAL_CT


def real_ct_crop(root: Path, size=(40, 36, 28)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A centred sub-volume of the real CT (image HU, label, affine) for fast tests."""
    img = nib.load(str(root / "image.nii.gz"))
    lab = nib.load(str(root / "label.nii.gz"))
    lab_arr = np.asarray(lab.dataobj)
    # centre on the labelled organs so the crop holds several classes
    c = np.round(np.argwhere((lab_arr > 0) & (lab_arr < 10)).mean(0)).astype(int)
    start = [max(0, min(ci - s // 2, n - s)) for ci, s, n in zip(c, size, lab_arr.shape)]
    sl = tuple(slice(a, a + s) for a, s in zip(start, size))
    shift = np.eye(4)
    shift[:3, 3] = start
    return np.asarray(img.dataobj)[sl], lab_arr[sl], img.affine @ shift


@pytest.fixture
def make_json():
    def _write(path, obj):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj))
        return str(path)

    return _write


@pytest.fixture
def dh():
    """The helpers above, as a fixture (test modules should not import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(phantom=phantom, write_nifti=write_nifti, write_dicom_series=write_dicom_series,
                           AFFINES=AFFINES, real_ct_crop=real_ct_crop)
