"""Preprocessing into cache space and its exact geometric inverse."""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest

from mambamim.data.errors import DataError
from mambamim.data.preprocess import (PreprocessParams, preprocess_image, preprocess_label, restore_to_original,
                                      save_nifti_atomic)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(0)
    return (np.asarray(affine) @ np.append(idx, 1.0))[:3]


def test_params_validation_and_roundtrip():
    p = PreprocessParams(spacing=2.0, min_size=32)
    assert p.spacing == (2.0, 2.0, 2.0) and p.min_size == (32, 32, 32)
    d = p.to_dict()
    json.dumps(d)
    assert PreprocessParams.from_dict(d) == p
    assert PreprocessParams.from_dict({**d, "future_key": 1}) == p
    assert PreprocessParams.from_dict({}) == PreprocessParams()
    assert PreprocessParams().spacing == (1.5, 1.5, 1.5) and PreprocessParams().hu_min == -175.0
    for bad in ({"spacing": 0}, {"spacing": (1, 2)}, {"hu_min": 10, "hu_max": 5}, {"min_size": -1},
                {"spacing": "abc"}):
        with pytest.raises(ValueError):
            PreprocessParams(**bad)


@pytest.mark.parametrize("orient", ["RAS", "LPS", "PLS"])
@pytest.mark.parametrize("mode", ["same", "up2"])
def test_label_round_trip_is_exact(tmp_path, dh, orient, mode):
    img, lab = dh.phantom((24, 20, 16))
    a = dh.AFFINES[orient]
    ip = dh.write_nifti(tmp_path / "i.nii.gz", img, a)
    lp = dh.write_nifti(tmp_path / "l.nii.gz", lab, a)
    ras_spacing = np.abs(a[:3, :3]).sum(axis=1)  # axis-aligned: world axis i has one non-zero entry
    # "same": keep the (anisotropic) RAS spacing; "up2": every axis upsampled by exactly 2
    spacing = ras_spacing if mode == "same" else ras_spacing / 2
    params = PreprocessParams(spacing=tuple(spacing), min_size=16, crop_margin=2)
    x, meta = preprocess_image(ip, params)
    y = preprocess_label(lp, meta, {"0": "bg", "1": "a", "2": "b"})
    json.loads(json.dumps(meta))  # meta is JSON-able
    assert x.dtype == np.float32 and x.shape[0] == 1 and y.shape == x.shape[1:] and y.dtype == np.uint8
    assert meta["original"]["axcodes"] == list(nib.aff2axcodes(a))
    assert nib.aff2axcodes(np.array(meta["cache"]["affine"])) == ("R", "A", "S")
    np.testing.assert_allclose(meta["resampled"]["spacing"], spacing)
    # the same anatomy sits at the same world position in both spaces
    for k in (1, 2):
        np.testing.assert_allclose(_world_centroid(y == k, meta["cache"]["affine"]), _world_centroid(lab == k, a),
                                   atol=0.5 * spacing.max() + 1e-6)
    back, back_aff = restore_to_original(y, meta, is_label=True)
    assert back.shape == lab.shape and back.dtype == np.uint8
    np.testing.assert_allclose(back_aff, a)
    assert np.array_equal(back, lab)
    # a probability map goes back on the same grid; its argmax is the label again
    probs = np.stack([(y == k).astype(np.float32) for k in range(3)])
    pb, _ = restore_to_original(probs, meta, is_label=False)
    assert pb.shape == (3,) + lab.shape
    assert np.array_equal(pb.argmax(0), lab)


def test_downsampling_round_trip_keeps_grid_and_anatomy(tmp_path, dh):
    img, lab = dh.phantom((32, 28, 20))
    a = dh.AFFINES["LPS"]
    ip = dh.write_nifti(tmp_path / "i.nii.gz", img, a)
    lp = dh.write_nifti(tmp_path / "l.nii.gz", lab, a)
    x, meta = preprocess_image(ip, PreprocessParams(spacing=(2.0, 2.0, 2.5), min_size=8))
    y = preprocess_label(lp, meta)
    back, aff = restore_to_original(y, meta)
    assert back.shape == lab.shape
    np.testing.assert_allclose(aff, a)
    for k, min_dice in ((1, 0.8), (2, 0.5)):  # class 2 is a 4x3x3 box: coarse grids cost more
        inter = np.logical_and(back == k, lab == k).sum()
        dice = 2 * inter / ((back == k).sum() + (lab == k).sum())
        assert dice > min_dice, (k, dice)


def test_intensity_window_crop_and_padding(tmp_path, dh, caplog):
    img, lab = dh.phantom((30, 26, 20))
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    ip = dh.write_nifti(tmp_path / "small.nii.gz", img, a)
    params = PreprocessParams(spacing=2.0, min_size=(32, 16, 16), crop_margin=1)
    with caplog.at_level(logging.WARNING):
        x, meta = preprocess_image(ip, params)
    assert 0.0 <= x.min() and x.max() <= 1.0
    # the body (HU 40) maps to (40 + 175) / 425, the kidney box (150 HU) to 325 / 425
    assert np.isclose(np.median(x[x > 0.3]), (40 + 175) / 425, atol=0.05)
    assert np.isclose(x.max(), 325 / 425, atol=1e-5)
    # the crop box hugs the body (+1 voxel margin) and the x axis was padded 30->32 minus crop
    body = img > -175
    for ax, (lo, hi) in enumerate(meta["crop"]["box"]):
        idx = np.flatnonzero(body.any(axis=tuple(j for j in range(3) if j != ax)))
        assert lo == max(0, idx[0] - 1) and hi == min(body.shape[ax], idx[-1] + 2)
    sizes = [hi - lo for lo, hi in meta["crop"]["box"]]
    assert x.shape[1:] == tuple(max(s, m) for s, m in zip(sizes, (32, 16, 16)))
    assert sum(meta["pad"][0]) == 32 - sizes[0] > 0
    assert "small.nii.gz" in caplog.text and "smaller than min_size" in caplog.text
    assert meta["warnings"] and meta["warnings"][0]["file"].endswith("small.nii.gz")
    # padding is zeros (the scaled value of air); crop off keeps the full field of view
    x2, meta2 = preprocess_image(ip, PreprocessParams(spacing=2.0, crop_foreground=False, min_size=0))
    assert x2.shape == (1, 30, 26, 20) and meta2["crop"]["applied"] is False and meta2["pad"] == [[0, 0]] * 3


def test_label_checks(tmp_path, dh):
    img, lab = dh.phantom((16, 12, 10))
    a = dh.AFFINES["RAS"]
    ip = dh.write_nifti(tmp_path / "i.nii.gz", img, a)
    _, meta = preprocess_image(ip, PreprocessParams(spacing=(1.5, 1.0, 2.0), min_size=0))
    shifted = a.copy()
    shifted[0, 3] += 3.0
    flipped = a @ np.diag([-1.0, 1, 1, 1])
    bad = {
        "shape.nii.gz": (lab[:, :, :-1], a, "label shape"),
        "affine.nii.gz": (lab, shifted, "not on the image's voxel grid .*origin 3 mm away"),
        # LAS about the image's origin: other voxels (a LAS label of the same voxels is reordered instead)
        "orient.nii.gz": (lab, flipped, "not on the image's voxel grid .*origin 22.5 mm away"),
        "values.nii.gz": (np.where(lab == 2, 7, lab).astype(np.uint8), a, r"label values \[7\]"),
    }
    for name, (arr, aff, msg) in bad.items():
        p = dh.write_nifti(tmp_path / name, arr, aff)
        with pytest.raises(DataError, match=msg) as err:
            preprocess_label(p, json.loads(json.dumps(meta)), {"0": "bg", "1": "a", "2": "b"})
        assert err.value.path == p
    nanimg = img.astype(np.float32)
    nanimg[3, 3, 3] = np.nan
    p = dh.write_nifti(tmp_path / "nan.nii.gz", nanimg, a)
    with pytest.raises(DataError, match="1 non-finite"):
        preprocess_image(p, PreprocessParams())


def test_many_classes_use_uint16(tmp_path, dh):
    img, lab = dh.phantom((16, 12, 10))
    lab16 = lab.astype(np.uint16) * 150  # values 0, 150, 300
    a = dh.AFFINES["RAS"]
    ip = dh.write_nifti(tmp_path / "i.nii.gz", img, a)
    lp = dh.write_nifti(tmp_path / "l.nii.gz", lab16, a)
    _, meta = preprocess_image(ip, PreprocessParams(spacing=(1.5, 1.0, 2.0), min_size=0))
    y = preprocess_label(lp, meta)
    assert y.dtype == np.uint16 and set(np.unique(y)) == {0, 150, 300}
    assert np.array_equal(restore_to_original(y, meta)[0], lab16)


def test_dicom_input_and_multichannel(tmp_path, dh):
    img, lab = dh.phantom((16, 12, 10))
    a = np.array([[-1.0, 0, 0, 10], [0, -1.2, 0, 5], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    dh.write_dicom_series(tmp_path / "dcm", img, a)
    nii = dh.write_nifti(tmp_path / "i.nii.gz", img, a)
    params = PreprocessParams(spacing=(1.0, 1.2, 2.0), min_size=0)
    xd, md = preprocess_image(str(tmp_path / "dcm"), params)
    xn, mn = preprocess_image(nii, params)
    assert md["input_format"] == "dicom" and np.allclose(xd, xn, atol=1e-6)
    np.testing.assert_allclose(md["original"]["affine"], a, atol=1e-5)
    y = preprocess_label(dh.write_nifti(tmp_path / "l.nii.gz", lab, a), md)
    assert np.array_equal(restore_to_original(y, md)[0], lab)
    x2, m2 = preprocess_image([nii, nii], params)
    assert x2.shape[0] == 2 and np.array_equal(x2[0], x2[1]) and np.array_equal(x2[0], xn[0])
    other = dh.write_nifti(tmp_path / "o.nii.gz", img[:-1], a)
    with pytest.raises(DataError, match="channel shape"):
        preprocess_image([nii, other], params)


def test_restore_rejects_wrong_shapes(tmp_path, dh):
    img, _ = dh.phantom((16, 12, 10))
    _, meta = preprocess_image(dh.write_nifti(tmp_path / "i.nii.gz", img, np.eye(4)), PreprocessParams(1.0, min_size=0))
    shape = meta["cache"]["shape"][1:]
    with pytest.raises(ValueError, match="cache shape"):
        restore_to_original(np.zeros([s + 1 for s in shape], np.uint8), meta)
    with pytest.raises(ValueError, match="is_label=False"):
        restore_to_original(np.zeros([2] + shape, np.float32), meta)


@pytest.mark.parametrize("isal", [True, False])
def test_save_nifti_atomic(tmp_path, monkeypatch, isal):
    """python-isal's one-call gzip (where installed) and nibabel's stream write the same image: data, dtype,
    affine and header read back equal, whatever the array's layout."""
    import mambamim.data.io as io

    if isal and io._igzip is None:
        pytest.skip("python-isal is not installed")
    if not isal:
        monkeypatch.setattr(io, "_igzip", None)
    arr = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    aff = np.diag([-1.0, 2.0, 3.0, 1.0])
    p = save_nifti_atomic(arr, aff, tmp_path / "sub" / "out.nii.gz")
    img = nib.load(p)
    assert np.array_equal(np.asarray(img.dataobj), arr) and np.allclose(img.affine, aff)
    assert sorted(os.listdir(tmp_path / "sub")) == ["out.nii.gz"]  # no temp file left
    save_nifti_atomic(arr * 2, aff, p)  # overwrite in place
    assert np.array_equal(np.asarray(nib.load(p).dataobj), arr * 2)
    lab = np.asfortranarray(np.random.default_rng(0).integers(0, 14, (9, 7, 5)).astype(np.uint8))
    for layout in (lab, np.ascontiguousarray(lab)):
        q = save_nifti_atomic(layout, aff, tmp_path / "lab.nii.gz")
        back = nib.load(q)
        assert back.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(back.dataobj), lab)
        ref = nib.Nifti1Image(lab, aff)
        ref.set_qform(ref.affine, code=1)
        ref.set_sform(ref.affine, code=1)
        assert back.header.binaryblock == nib.Nifti1Image.from_bytes(ref.to_bytes()).header.binaryblock


@pytest.mark.parametrize("flip", [False, True])
def test_real_ct_label_survives(tmp_path, dh, real_ct, flip):
    img, lab, a = dh.real_ct_crop(real_ct)
    if flip:  # store it LPS: same anatomy, x and y axes reversed
        img, lab = img[::-1, ::-1].copy(), lab[::-1, ::-1].copy()
        a = a @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, -1, 0, img.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    ip = dh.write_nifti(tmp_path / "ct.nii.gz", img, a)
    lp = dh.write_nifti(tmp_path / "seg.nii.gz", lab, a)
    x, meta = preprocess_image(ip, PreprocessParams(min_size=32))  # 3 mm -> 1.5 mm, the default recipe
    y = preprocess_label(lp, meta)
    assert x.shape[1:] == y.shape and all(s >= 32 for s in y.shape)
    assert len(np.unique(lab)) > 5 and set(np.unique(y)) == set(np.unique(lab))
    back, aff = restore_to_original(y, meta)
    np.testing.assert_allclose(aff, a)
    assert np.array_equal(back, lab)


def test_separable_resampling_equals_scipy_trilinear():
    from scipy import ndimage

    from mambamim.data.preprocess import _resample

    v = np.random.default_rng(0).normal(size=(2, 15, 12, 9)).astype(np.float32)
    m = np.diag([0.37, 0.8, 1.7, 1.0])
    m[:3, 3] = [0.2, -0.3, 0.1]
    out = _resample(v, m, (30, 14, 5), order=1)
    for c in range(2):
        ref = ndimage.affine_transform(v[c], np.diag(m[:3, :3]), offset=m[:3, 3], output_shape=(30, 14, 5),
                                       order=1, mode="nearest")
        np.testing.assert_allclose(out[c], ref, atol=1e-5)
    lab = np.random.default_rng(1).integers(0, 4, (15, 12, 9)).astype(np.uint8)
    near = _resample(lab, np.diag([2.0, 1.0, 0.5, 1.0]), (7, 12, 18), order=0)
    sub = lab[0:14:2]  # x: every other voxel; z: odd outputs sit halfway (ties: by row, checkerboard)
    odd = (np.arange(7)[:, None] + np.arange(12)[None, :]) % 2
    ref = np.stack([sub[:, :, min(i // 2, 8)] if i % 2 == 0 or i == 17  # z = 8.5 clips to the last voxel
                    else np.where(odd == 1, sub[:, :, i // 2 + 1], sub[:, :, i // 2])
                    for i in range(18)], axis=-1)
    assert near.dtype == np.uint8 and np.array_equal(near, ref)


@pytest.mark.parametrize("order", [0, 1])
def test_resampling_does_not_depend_on_memory_layout(order):
    """The passes run in memory order (NIfTI arrays come X-fastest): C order, Fortran order and a flipped,
    transposed view give bit-identical results, ties of the nearest-neighbour passes included."""
    from mambamim.data.preprocess import _resample

    rng = np.random.default_rng(order)
    v = rng.integers(0, 5, (2, 16, 11, 9)).astype(np.uint8 if order == 0 else np.float32)
    m = np.diag([2.0, 0.5, 0.75, 1.0])  # downsampling, ties (0.5) and upsampling on three axes
    m[:3, 3] = [0.0, 0.25, -0.1]
    ref = _resample(np.ascontiguousarray(v), m, (8, 21, 12), order)
    flipped = np.ascontiguousarray(v[:, ::-1].transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)[:, ::-1]
    for layout, want in ((np.asfortranarray(v), ref), (flipped, ref), (np.asfortranarray(v[0])[None], ref[:1]),
                         (np.asfortranarray(v[1]), ref[1])):
        assert np.array_equal(layout, v[: len(want)] if want.ndim == 4 else v[1])
        assert np.array_equal(_resample(layout, m, (8, 21, 12), order), want)


def test_threaded_resampling_gives_the_same_values(tmp_path):
    """The linear passes split into slabs over threads: any thread count, any memory layout, a slab count that
    does not divide the volume, float32 and float64, and the whole preprocessing of a file give the values of
    one thread, bit for bit."""
    from mambamim.data.preprocess import _resample

    rng = np.random.default_rng(3)
    m = np.diag([0.7, 1.3, 0.55, 1.0])
    m[:3, 3] = [0.2, -0.1, 0.3]
    for v in (np.asfortranarray(rng.random((23, 17, 13), dtype=np.float32)), rng.random((1, 23, 17, 13)),
              np.asfortranarray(rng.random((2, 9, 30, 7), dtype=np.float32))):
        ref = _resample(v, m, (31, 12, 22), 1, threads=1)
        for threads in (2, 3, 7, 64):
            got = _resample(v, m, (31, 12, 22), 1, threads=threads)
            assert got.dtype == ref.dtype == v.dtype and np.array_equal(got, ref), (v.shape, threads)
    vol = rng.normal(0, 200, (50, 40, 24)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, -0.8, 2.0, 1.0])), str(path))
    params = PreprocessParams(spacing=(1.5, 1.5, 1.5), min_size=(8, 8, 8))
    one, meta = preprocess_image(str(path), params, threads=1)
    many, meta4 = preprocess_image(str(path), params, threads=4)
    assert np.array_equal(one, many) and meta == meta4


def test_preprocessed_image_is_c_contiguous(tmp_path, dh):
    """What the cache writer and the loaders get: a C-ordered float32 array, whatever the file's layout."""
    vol = np.random.default_rng(0).normal(0, 200, (40, 30, 20)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, -0.8, 2.0, 1.0])), str(path))
    image, _ = preprocess_image(str(path), PreprocessParams(spacing=(1.5, 1.5, 1.5), min_size=(8, 8, 8)))
    assert image.dtype == np.float32 and image.flags["C_CONTIGUOUS"]


def test_oblique_input_round_trip(tmp_path, dh):
    img, lab = dh.phantom((20, 16, 12))
    t = np.deg2rad(25)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([-1.2, 1.0, 2.0])
    a[:3, 3] = [5, -3, 8]
    ip = dh.write_nifti(tmp_path / "i.nii.gz", img, a)
    lp = dh.write_nifti(tmp_path / "l.nii.gz", lab, a)
    # the closest RAS axes of this grid are the input's (x 1.2 mm, y 1.0 mm, z 2.0 mm): upsample each by 2
    _, meta = preprocess_image(ip, PreprocessParams(spacing=(0.6, 0.5, 1.0), min_size=0))
    assert meta["resampled"]["scale"] == pytest.approx([0.5, 0.5, 0.5])
    y = preprocess_label(lp, meta)
    np.testing.assert_allclose(_world_centroid(y == 1, meta["cache"]["affine"]), _world_centroid(lab == 1, a),
                               atol=0.6)
    back, aff = restore_to_original(y, meta)
    np.testing.assert_allclose(aff, a)
    assert np.array_equal(back, lab)
