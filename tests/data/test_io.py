"""Reading and discovery: NIfTI, DICOM series, nnU-Net raw, Decathlon, plain folders, bad files."""

from __future__ import annotations

import gzip
import importlib.util
import os

import nibabel as nib
import numpy as np
import pytest

from mambamim.data.errors import DataError
from mambamim.data.io import discover_cases, discover_dataset, read_image, read_label, scan_dicom_folder


def _rotation(deg_x=10.0, deg_z=20.0):
    ax, az = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def test_read_nifti_values_affine_and_squeeze(tmp_path, dh):
    img, _ = dh.phantom((12, 10, 8))
    a = dh.AFFINES["LPS"]
    p = dh.write_nifti(tmp_path / "a.nii.gz", img, a)
    data, aff, info = read_image(p)
    assert data.dtype == np.float32 and np.array_equal(data, img.astype(np.float32))
    np.testing.assert_allclose(aff, a)
    assert info["axcodes"] == ["L", "P", "S"] and info["spacing"] == pytest.approx([1.5, 1.0, 2.0])
    p4 = dh.write_nifti(tmp_path / "b.nii", img[..., None], a)  # singleton 4th dim is squeezed
    data4, _, _ = read_image(p4)
    assert data4.shape == (12, 10, 8) and np.array_equal(data4, data)


@pytest.mark.skipif(importlib.util.find_spec("isal") is None, reason="python-isal is not installed")
def test_fast_gzip_reading_gives_nibabels_array(tmp_path, dh):
    """python-isal's one-call decompression and nibabel's gzip stream give the same scaled array, for
    integer data with a slope and intercept as for floats; a truncated file fails either way."""
    from mambamim.data.io import read_array

    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 2000, (30, 20, 10)).astype(np.int16)
    img = nib.Nifti1Image(vol, dh.AFFINES["LPS"])
    img.header.set_slope_inter(0.5, -3.0)
    p = str(tmp_path / "s.nii.gz")
    nib.save(img, p)
    fast, plain = read_array(p, nib.load(p)), read_array(p, nib.load(p), fast=False)
    assert fast.dtype == plain.dtype and np.array_equal(fast, plain) and np.array_equal(plain, vol * 0.5 - 3.0)
    raw = open(p, "rb").read()
    (tmp_path / "t.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_image(tmp_path / "t.nii.gz")


@pytest.mark.parametrize("oblique", [False, True])
def test_dicom_series_matches_nifti_of_same_data(tmp_path, dh, oblique):
    img, _ = dh.phantom((14, 12, 9))
    affine = np.array([[-0.8, 0, 0, 100.0], [0, -0.7, 0, 50.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    if oblique:
        affine[:3, :3] = _rotation() @ affine[:3, :3]
    uid = dh.write_dicom_series(tmp_path / "dcm", img, affine, slope=2.0, intercept=-2048.0)
    nii = dh.write_nifti(tmp_path / "same.nii.gz", img, affine)
    d_data, d_aff, d_info = read_image(tmp_path / "dcm")
    n_data, n_aff, _ = read_image(nii)
    assert d_info["format"] == "dicom" and d_info["series_uid"] == uid and d_info["n_slices"] == 9
    np.testing.assert_allclose(d_aff, n_aff, atol=1e-4)
    # slope 2 means odd HU values round to even ones when stored
    assert np.abs(d_data - n_data).max() <= 1.0
    assert np.array_equal(d_data, 2 * np.round((n_data + 2048) / 2) - 2048)


def test_dicom_reversed_slice_direction_still_sorted(tmp_path, dh):
    img, _ = dh.phantom((10, 8, 7))
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, -3.0, 40.0], [0, 0, 0, 1]])  # slices going down
    dh.write_dicom_series(tmp_path / "d", img, affine)
    data, aff, _ = read_image(tmp_path / "d")
    # the reader sorts along the slice normal (+S for axial), so the z axis comes out flipped
    assert np.array_equal(data, img[:, :, ::-1].astype(np.float32))
    world_first = affine @ np.array([3, 4, 6, 1.0])
    np.testing.assert_allclose(aff @ np.array([3, 4, 0, 1.0]), world_first, atol=1e-4)


def test_two_series_in_one_folder(tmp_path, dh):
    a, _ = dh.phantom((10, 8, 6), seed=1)
    b, _ = dh.phantom((10, 8, 5), seed=2)
    aff = np.diag([-1.0, -1.0, 2.0, 1.0])
    uid_a = dh.write_dicom_series(tmp_path / "s", a, aff, series_number=1, prefix="A")
    uid_b = dh.write_dicom_series(tmp_path / "s", b, aff, series_number=2, prefix="B")
    (tmp_path / "s" / "notes.txt").write_text("not dicom")
    groups = scan_dicom_folder(tmp_path / "s")
    assert set(groups) == {uid_a, uid_b} and len(groups[uid_a]) == 6 and len(groups[uid_b]) == 5
    cases = discover_cases(tmp_path)
    assert len(cases) == 2 and len({c.case_id for c in cases}) == 2
    by_uid = {c.image_paths[0].rsplit("#", 1)[1]: c for c in cases}
    assert np.array_equal(read_image(by_uid[uid_b].image_paths[0])[0], b.astype(np.float32))
    with pytest.raises(DataError, match="2 DICOM series"):
        read_image(tmp_path / "s")
    # one slice file stands for its whole series
    one_b = sorted(p for p in groups[uid_b])[0]
    assert np.array_equal(read_image(one_b)[0], b.astype(np.float32))
    assert discover_cases(one_b)[0].image_paths == [f"{tmp_path / 's'}#{uid_b}"]


def test_dicom_missing_slice_is_reported(tmp_path, dh):
    img, _ = dh.phantom((8, 8, 6))
    dh.write_dicom_series(tmp_path / "d", img, np.diag([-1.0, -1.0, 2.0, 1.0]), shuffle=False)
    os.unlink(tmp_path / "d" / "IM0003")
    with pytest.raises(DataError, match="irregular slice spacing"):
        read_image(tmp_path / "d")


def test_nnunet_raw_layout(tmp_path, dh, make_json):
    root = tmp_path / "Dataset001_Test"
    img, lab = dh.phantom((10, 8, 6))
    a = dh.AFFINES["RAS"]
    for cid in ("case_a", "case_b"):
        dh.write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", img, a)
        dh.write_nifti(root / "imagesTr" / f"{cid}_0001.nii.gz", img + 1, a)
        dh.write_nifti(root / "labelsTr" / f"{cid}.nii.gz", lab, a)
    dh.write_nifti(root / "imagesTr" / "case_c_0000.nii.gz", img, a)  # channel 1 missing
    dh.write_nifti(root / "labelsTr" / "case_c.nii.gz", lab, a)
    dh.write_nifti(root / "labelsTr" / "orphan.nii.gz", lab, a)
    dh.write_nifti(root / "imagesTs" / "test_x_0000.nii.gz", img, a)
    dh.write_nifti(root / "imagesTs" / "test_x_0001.nii.gz", img, a)
    make_json(root / "dataset.json", {"channel_names": {"0": "CT", "1": "CT2"},
                                      "labels": {"background": 0, "organ": 1, "tumor": 2},
                                      "numTraining": 3, "file_ending": ".nii.gz"})
    ds = discover_dataset(root)
    assert ds.kind == "nnunet" and ds.labels == {"0": "background", "1": "organ", "2": "tumor"}
    by_id = {c.case_id: c for c in ds.cases}
    assert set(by_id) == {"case_a", "case_b", "case_c", "orphan", "test_x"}
    ca = by_id["case_a"]
    assert [os.path.basename(p) for p in ca.image_paths] == ["case_a_0000.nii.gz", "case_a_0001.nii.gz"]
    assert ca.label_path.endswith("labelsTr/case_a.nii.gz") and ca.split == "train" and ca.error is None
    assert "channel(s) [1] missing" in by_id["case_c"].error
    assert by_id["orphan"].error and "no image" in by_id["orphan"].error
    assert by_id["test_x"].split == "test" and by_id["test_x"].label_path is None and by_id["test_x"].error is None


def test_decathlon_json(tmp_path, dh, make_json):
    root = tmp_path / "Task09_Spleen"
    img, lab = dh.phantom((10, 8, 6))
    a = dh.AFFINES["LPS"]
    dh.write_nifti(root / "imagesTr" / "spleen_1.nii.gz", img, a)
    dh.write_nifti(root / "labelsTr" / "spleen_1.nii.gz", lab, a)
    dh.write_nifti(root / "imagesTr" / "spleen_2.nii.gz", img, a)
    dh.write_nifti(root / "labelsTr" / "spleen_2.nii.gz", lab, a)
    dh.write_nifti(root / "imagesTs" / "spleen_9.nii.gz", img, a)
    j = make_json(root / "dataset.json", {
        "name": "Spleen", "labels": {"0": "background", "1": "spleen"}, "modality": {"0": "CT"},
        "training": [{"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"},
                     {"image": "./imagesTr/spleen_3.nii.gz", "label": "./labelsTr/spleen_3.nii.gz"}],
        "validation": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}],
        "test": ["./imagesTs/spleen_9.nii.gz"]})
    for arg in (j, root):  # the json itself or its folder
        ds = discover_dataset(arg)
        assert ds.kind == "decathlon" and ds.labels == {"0": "background", "1": "spleen"}
        splits = {c.case_id: (c.split, c.error) for c in ds.cases}
        assert splits["spleen_1"] == ("train", None) and splits["spleen_2"] == ("val", None)
        assert splits["spleen_9"] == ("test", None)
        assert "does not exist" in splits["spleen_3"][1]
        bad = next(c for c in ds.cases if c.case_id == "spleen_3")
        assert bad.error_path.endswith("imagesTr/spleen_3.nii.gz")
    assert np.array_equal(read_label(ds.cases[0].label_path)[0], lab)


def test_plain_folders_and_pairs(tmp_path, dh):
    img, lab = dh.phantom((10, 8, 6))
    a = dh.AFFINES["RAS"]
    dh.write_nifti(tmp_path / "flat" / "ct1.nii.gz", img, a)
    dh.write_nifti(tmp_path / "flat" / "ct1_seg.nii.gz", lab, a)
    dh.write_nifti(tmp_path / "flat" / "ct2.nii", img, a)
    dh.write_nifti(tmp_path / "flat" / "patient7" / "image.nii.gz", img, a)
    dh.write_nifti(tmp_path / "flat" / "patient7" / "label.nii.gz", lab, a)
    dh.write_nifti(tmp_path / "flat" / "lonely_seg.nii.gz", lab, a)
    cases = {c.case_id: c for c in discover_cases(tmp_path / "flat")}
    assert set(cases) == {"ct1", "ct2", "patient7", "lonely_seg"}
    # named like a label, nothing to pair with: an image candidate, checked by its values when prepared
    assert cases["lonely_seg"].error is None and cases["lonely_seg"].label_named
    assert not cases["ct1"].label_named and not cases["patient7"].label_named
    assert cases["ct1"].label_path.endswith("ct1_seg.nii.gz") and cases["ct2"].label_path is None
    assert cases["patient7"].label_path.endswith("patient7/label.nii.gz")
    dh.write_nifti(tmp_path / "pairs" / "images" / "x1.nii.gz", img, a)
    dh.write_nifti(tmp_path / "pairs" / "labels" / "x1.nii.gz", lab, a)
    dh.write_nifti(tmp_path / "pairs" / "images" / "x2.nii.gz", img, a)
    ds = discover_dataset(tmp_path / "pairs")
    assert ds.kind == "pairs"
    pc = {c.case_id: c for c in ds.cases}
    assert pc["x1"].label_path.endswith("labels/x1.nii.gz") and pc["x1"].error is None
    assert "no label" in pc["x2"].error


def test_real_ct_folder(real_ct):
    ds = discover_dataset(real_ct)
    assert len(ds.cases) == 1 and ds.cases[0].label_path.endswith("label.nii.gz")
    assert ds.labels["1"] == "spleen" and ds.labels["0"] == "background" and len(ds.labels) == 118
    data, aff, info = read_image(ds.cases[0].image_paths[0])
    assert data.shape == (122, 101, 112) and info["axcodes"] == ["R", "A", "S"]
    assert -1300 < data.min() < -900 and data.max() > 500  # Hounsfield units
    assert -1050 < np.percentile(data, 5) < -950  # air around the body


def test_bad_files_give_clear_errors(tmp_path, dh):
    img, lab = dh.phantom((10, 8, 6))
    a = dh.AFFINES["RAS"]
    good = dh.write_nifti(tmp_path / "good.nii.gz", img, a)
    noisy = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40)).astype(np.int16)
    raw = open(dh.write_nifti(tmp_path / "big.nii.gz", noisy, a), "rb").read()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 30))
    dh.write_nifti(tmp_path / "flat2d.nii.gz", img[:, :, 0], a)
    dh.write_nifti(tmp_path / "fourd.nii.gz", np.stack([img, img], -1), a)
    dh.write_nifti(tmp_path / "oneslice.nii.gz", img[:, :, :1], a)
    dh.write_nifti(tmp_path / "floatlab.nii.gz", lab + 0.5, a)
    cases = [
        ("trunc.nii.gz", "truncated or corrupt"),
        ("garbage.nii.gz", "cannot read"),
        ("flat2d.nii.gz", "2D image"),
        ("fourd.nii.gz", "4D image"),
        ("oneslice.nii.gz", "2D image"),
        ("missing.nii.gz", "does not exist"),
    ]
    for name, msg in cases:
        with pytest.raises(DataError, match=msg) as err:
            read_image(tmp_path / name)
        assert err.value.path.endswith(name) and name in str(err.value)
    with pytest.raises(DataError, match="non-integer"):
        read_label(tmp_path / "floatlab.nii.gz")
    with pytest.raises(DataError, match="unsupported"):
        read_image(tmp_path / "x.mha") if (tmp_path / "x.mha").write_text("x") else None
    assert isinstance(DataError("f", "p"), ValueError)
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nowhere")
    assert nib.load(good).shape == (10, 8, 6)
