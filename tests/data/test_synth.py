"""Synthetic CT phantoms: determinism, anatomy, Hounsfield units, orientation, dataset.json."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mambamim.data.synth import BTCV_LABELS, make_phantom, synth_dataset

TINY = dict(inplane_voxels=(64, 88), inplane_spacing=(4.0, 5.0), slice_spacing=(4.0, 5.0))
N = 6


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    meta = synth_dataset(out, num=N, seed=3, **TINY)
    return out, meta


@pytest.fixture(scope="module")
def canonical(synth_dir):
    """(image HU, label, affine) of every volume after reorientation to RAS."""
    out, meta = synth_dir
    vols = []
    for entry in meta["training"]:
        img = nib.as_closest_canonical(nib.load(os.path.join(out, entry["image"])))
        lab = nib.as_closest_canonical(nib.load(os.path.join(out, entry["label"])))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.affine, lab.affine)
        vols.append((np.asarray(img.dataobj), np.asarray(lab.dataobj), img.affine))
    return vols


def test_dataset_json_and_files(synth_dir):
    out, meta = synth_dir
    with open(os.path.join(out, "dataset.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {str(k): v for k, v in BTCV_LABELS.items()}
    assert meta["labels"]["1"] == "spleen" and meta["labels"]["6"] == "liver" and meta["labels"]["13"] == "left adrenal gland"
    assert meta["numTraining"] == N == len(meta["training"])
    for e in meta["training"]:
        assert e["image"].startswith("./imagesTr/") and e["label"] == e["image"].replace("imagesTr", "labelsTr")
        img, lab = nib.load(os.path.join(out, e["image"])), nib.load(os.path.join(out, e["label"]))
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape


def test_same_seed_same_bytes_different_seed_differs(synth_dir, tmp_path):
    out, meta = synth_dir
    again = synth_dataset(str(tmp_path / "a"), num=2, seed=3, **TINY)  # fewer volumes: each depends on (seed, i) only
    other = synth_dataset(str(tmp_path / "b"), num=2, seed=4, **TINY)
    for e in again["training"]:
        for key in ("image", "label"):
            with open(os.path.join(out, e[key]), "rb") as f1, open(os.path.join(tmp_path / "a", e[key]), "rb") as f2:
                assert f1.read() == f2.read()
    for e in other["training"]:
        with open(os.path.join(out, e["image"]), "rb") as f1, open(os.path.join(tmp_path / "b", e["image"]), "rb") as f2:
            assert f1.read() != f2.read()
    a, b = make_phantom([9, 0], **TINY), make_phantom([9, 0], **TINY)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)


def test_geometry_varies(synth_dir):
    _, meta = synth_dir
    cases = meta["synthetic"]["cases"]
    assert len({tuple(c["shape"]) for c in cases}) > 1
    assert len({round(c["spacing"][0], 3) for c in cases}) > 1 and len({round(c["spacing"][2], 3) for c in cases}) > 1


def test_orientations_vary_and_liver_on_patient_right(synth_dir, canonical):
    out, meta = synth_dir
    codes = [nib.aff2axcodes(nib.load(os.path.join(out, e["image"])).affine) for e in meta["training"]]
    assert ("L", "P", "S") in codes and ("R", "A", "S") in codes and len(set(codes)) >= 3
    for (image, label, affine), code in zip(canonical, codes):
        def world_centroid(mask):
            return (affine @ np.r_[np.argwhere(mask).mean(0), 1.0])[:3]
        body_x = world_centroid(image > -500)[0]
        liver, spleen = world_centroid(label == 6), world_centroid(label == 1)
        rk, lk = world_centroid(label == 2), world_centroid(label == 3)
        # RAS: +x is the patient's right, +y anterior, +z superior
        assert liver[0] > body_x + 20 and spleen[0] < body_x - 20, code
        assert rk[0] > body_x > lk[0], code
        lungs = (image < -700) & (label == 0)
        lungs &= ndimage.binary_fill_holes(image > -500, structure=np.ones((3, 3, 1)))  # inside the body
        assert world_centroid(lungs)[2] > liver[2], code  # lungs at the top
        assert world_centroid(label == 8)[1] < world_centroid(label == 7)[1], code  # aorta behind the stomach


def test_every_label_present_and_inside_body(canonical):
    for image, label, _ in canonical:
        counts = np.bincount(label.ravel(), minlength=14)
        assert counts.size == 14 and np.all(counts[1:] > 0), counts
        body = np.stack([ndimage.binary_fill_holes(image[:, :, k] > -500) for k in range(image.shape[2])], axis=2)
        assert np.all(body[label > 0])
        assert image.min() >= -1024 and np.mean(image[~body]) < -950  # air outside


# Means over each organ's interior (eroded by one voxel: the image is slightly smoothed, so edge voxels mix
# with fat); organs too small to have an interior on these coarse test grids get the wider second range.
HU_RANGES = {
    1: (30, 65), 2: (125, 175), 3: (125, 175), 4: (-10, 30), 5: (15, 65), 6: (45, 75), 8: (150, 210),
    9: (140, 200), 10: (120, 200), 11: (25, 60), 12: (10, 60), 13: (10, 60),
}
SMALL_RANGES = {lab: (lo - 120, hi) for lab, (lo, hi) in HU_RANGES.items()}


def test_plausible_hounsfield_units(canonical):
    n_interior = 0
    for image, label, _ in canonical:
        for lab, (lo, hi) in HU_RANGES.items():
            interior = ndimage.binary_erosion(label == lab)
            if interior.sum() >= 5:
                mean = float(image[interior].mean())
                n_interior += 1
            else:
                mean = float(image[label == lab].mean())
                lo, hi = SMALL_RANGES[lab]
            assert lo <= mean <= hi, (BTCV_LABELS[lab], mean)
        stomach = image[label == 7]
        assert stomach.min() < -600  # gas pocket
        assert 0 <= np.median(stomach) <= 60
        assert image[(image > 300)].size > 0  # bone
        noise = image[ndimage.binary_erosion(label == 6)].std()
        assert 4 < noise < 25  # liver interior: 10-20 HU noise, slightly smoothed
    assert n_interior >= 6 * len(canonical)


def test_unlabeled(tmp_path):
    meta = synth_dataset(str(tmp_path), num=1, seed=0, unlabeled=True, **TINY)
    assert not os.path.exists(tmp_path / "labelsTr")
    assert meta["training"] == [{"image": "./imagesTr/synth_000.nii.gz"}]
    assert os.path.isfile(tmp_path / "imagesTr" / "synth_000.nii.gz")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        synth_dataset(str(tmp_path), num=0)
    with pytest.raises(ValueError):
        synth_dataset(str(tmp_path), num=1, orientations=["XYZ"])
    with pytest.raises(ValueError):
        make_phantom(0, slice_spacing=(3.0, 1.0))


def test_cli(tmp_path):
    from mambamim.cli.main import main

    rc = main(["data", "synth", "--out", str(tmp_path), "--num", "2", "--seed", "1", "--workers", "1",
               "--inplane-voxels", "48", "56", "--inplane-spacing", "6", "7", "--slice-spacing", "6", "7"])
    assert rc == 0
    with open(tmp_path / "dataset.json") as f:
        assert json.load(f)["numTraining"] == 2
    assert len(os.listdir(tmp_path / "labelsTr")) == 2


def test_organ_subset_relabels_and_keeps_the_anatomy(tmp_path):
    import nibabel as nib

    from mambamim.data.synth import organ_lookup, synth_dataset

    kw = dict(num=1, inplane_voxels=(56, 72), inplane_spacing=(5.0, 6.0), slice_spacing=(6.0, 8.0))
    full = synth_dataset(str(tmp_path / "all"), **kw)
    sub = synth_dataset(str(tmp_path / "sub"), organs=(6, 2), **kw)
    assert sub["labels"] == {"0": "background", "1": "liver", "2": "right kidney"}
    assert full["labels"]["6"] == "liver"
    read = lambda p: np.asarray(nib.load(p).dataobj)  # noqa: E731
    lab_all, lab_sub = (read(tmp_path / d / "labelsTr" / "synth_000.nii.gz") for d in ("all", "sub"))
    np.testing.assert_array_equal(lab_sub, np.where(lab_all == 6, 1, np.where(lab_all == 2, 2, 0)))
    img_all, img_sub = (read(tmp_path / d / "imagesTr" / "synth_000.nii.gz") for d in ("all", "sub"))
    np.testing.assert_array_equal(img_all, img_sub)  # unlabelled organs stay in the image
    for bad in ((0,), (6, 6), (14,), ()):
        with pytest.raises(ValueError):
            organ_lookup(bad)
