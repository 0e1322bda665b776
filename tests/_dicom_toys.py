"""A DICOM CT series writer shared by the data and CLI tests."""

from __future__ import annotations

import os

import numpy as np


def write_dicom_series(folder, vol_hu, affine_ras, series_uid=None, series_number=1, study_uid=None,
                       slope=1.0, intercept=-2048.0, shuffle=True, prefix="IM") -> str:
    """Write ``vol_hu`` (X, Y, Z) as single-frame CT slices whose geometry is ``affine_ras``.

    X runs along DICOM columns (row direction), Y along rows, Z across slices. Returns the SeriesInstanceUID.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
    c0, c1, c2, origin = lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3]
    ps_col, ps_row = np.linalg.norm(c0), np.linalg.norm(c1)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    nz = vol_hu.shape[2]
    order = np.random.default_rng(1).permutation(nz) if shuffle else np.arange(nz)
    for name_idx, k in enumerate(order):
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
        ds.SeriesNumber = series_number
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * c2]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([c0 / ps_col, c1 / ps_row])]
        ds.PixelSpacing = [f"{ps_row:.6f}", f"{ps_col:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(c2):.6f}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.Rows, ds.Columns = vol_hu.shape[1], vol_hu.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        stored = np.round((vol_hu[:, :, k].T.astype(np.float64) - intercept) / slope).astype("<u2")
        ds.PixelData = stored.tobytes()
        ds.save_as(os.path.join(folder, f"{prefix}{name_idx:04d}"), enforce_file_format=True)
    return series_uid
