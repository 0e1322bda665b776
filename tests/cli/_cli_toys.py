"""Toys for the CLI tests: a thresholding segmenter, its checkpoint info, phantom NIfTI writers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from torch import nn

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


def write_dicom_series(folder, vol_hu, affine_ras):
    """Write ``vol_hu`` (X, Y, Z) as single-frame CT slices (X along DICOM columns, Y along rows,
    Z across slices) whose geometry is ``affine_ras``; slice files in shuffled order."""
    import os

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
    c0, c1, c2, origin = lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3]
    ps_col, ps_row = np.linalg.norm(c0), np.linalg.norm(c1)
    series_uid, study_uid = generate_uid(), generate_uid()
    intercept = -2048.0
    for n, k in enumerate(np.random.default_rng(1).permutation(vol_hu.shape[2])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = "P1"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * c2]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([c0 / ps_col, c1 / ps_row])]
        ds.PixelSpacing = [f"{ps_row:.6f}", f"{ps_col:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(c2):.6f}"
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.Rows, ds.Columns = vol_hu.shape[1], vol_hu.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.round(vol_hu[:, :, k].T.astype(np.float64) - intercept).astype("<u2").tobytes()
        ds.save_as(os.path.join(folder, f"IM{n:04d}"), enforce_file_format=True)
    return series_uid
