"""Every bad input gets a named error (issue 18 item 3) and a DICOM series with a NIfTI label map is usable
(issue 18 item 4): --out a file or read-only, cached .npy truncated or deleted, a DICOM slice of random
bytes, each bad case listed, constant images left out, non-ASCII case ids, the label pairing rule, the
DICOM + label.nii.gz layouts, manifests, and label / image compared in world space."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from mambamim.data.cache import load_case
from mambamim.data.errors import DataError
from mambamim.data.io import discover_cases, discover_dataset, read_image
from mambamim.data.prepare import prepare_dataset
from mambamim.data.preprocess import PreprocessParams, preprocess_image, preprocess_label

PARAMS = PreprocessParams(spacing=2.0, min_size=16, crop_margin=2)
LPS_AFF = np.array([[-2.0, 0, 0, 20.0], [0, -2.0, 0, 30.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])


def _flip_axis(affine: np.ndarray, shape, axis: int) -> np.ndarray:
    """The affine of the same world grid with array axis ``axis`` reversed."""
    f = np.eye(4)
    f[axis, axis] = -1
    f[axis, 3] = shape[axis] - 1
    return affine @ f


# ---------------------------------------------------------------------------------------------------------
# --out


def test_prepare_out_is_a_file(tmp_path, dh):
    img, _ = dh.phantom((12, 10, 8))
    src = dh.write_nifti(tmp_path / "in" / "a.nii.gz", img, dh.AFFINES["RAS"])
    out = tmp_path / "out"
    out.write_text("I am a file")
    with pytest.raises(DataError, match="is a file, not a folder") as err:
        prepare_dataset(src, out, PARAMS, progress=False)
    assert err.value.path == str(out)
    with pytest.raises(DataError, match="is a file") as err:
        prepare_dataset(src, out / "sub", PARAMS, progress=False)
    assert out.read_text() == "I am a file"


def test_prepare_out_read_only(tmp_path, dh, read_only):
    img, _ = dh.phantom((12, 10, 8))
    src = dh.write_nifti(tmp_path / "in" / "a.nii.gz", img, dh.AFFINES["RAS"])
    ro = read_only(tmp_path / "ro")
    for out in (ro, ro / "cache"):
        with pytest.raises(DataError, match="not writable") as err:
            prepare_dataset(src, out, PARAMS, progress=False)
        assert str(ro) in str(err.value)
    assert not (ro / "cache").exists()


# ---------------------------------------------------------------------------------------------------------
# the cache


@pytest.fixture
def small_cache(tmp_path, dh):
    img, lab = dh.phantom((20, 18, 14))
    for cid in ("c1", "c2"):
        dh.write_nifti(tmp_path / "raw" / f"{cid}.nii.gz", img, dh.AFFINES["RAS"])
        dh.write_nifti(tmp_path / "raw" / f"{cid}_seg.nii.gz", lab, dh.AFFINES["RAS"])
    prepare_dataset(tmp_path / "raw", tmp_path / "cache", PARAMS, progress=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("what", ["image", "label"])
@pytest.mark.parametrize("damage", ["truncated", "deleted", "garbage"])
def test_cached_npy_truncated_or_deleted_is_named(small_cache, what, damage):
    from mambamim.data.loaders import build_eval_dataset, build_train_dataset

    f = small_cache / "cases" / "c2" / f"{what}.npy"
    raw = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(raw[: len(raw) - 100])
    elif damage == "deleted":
        f.unlink()
    else:
        f.write_bytes(b"\0" * len(raw))
    load_case(small_cache, "c1")  # the other case is fine
    for mmap in (True, False):
        with pytest.raises(DataError) as err:
            load_case(small_cache, "c2", mmap=mmap)
        msg = str(err.value)
        assert err.value.path == str(f) and "'c2'" in msg and "mambamim data prepare" in msg, msg
        assert ("missing" if damage == "deleted" else damage if damage == "truncated" else "not a valid") in msg
    for build in (lambda: build_train_dataset(small_cache, labeled=True), lambda: build_eval_dataset(small_cache)):
        with pytest.raises(DataError, match="'c2'.*mambamim data prepare"):
            build()
    # and the advice works: a rerun of prepare redoes that case only
    rep = prepare_dataset(small_cache.parent / "raw", small_cache, PARAMS, progress=False)
    assert rep.prepared == ["c2"] and rep.skipped == ["c1"]
    assert f.read_bytes() == raw and load_case(small_cache, "c2")["label"] is not None


# ---------------------------------------------------------------------------------------------------------
# DICOM


@pytest.mark.parametrize("which", ["IM0003", "IM0005"])
def test_dicom_slice_of_random_bytes_is_named(tmp_path, dh, which, caplog):
    img, _ = dh.phantom((8, 8, 6))
    dh.write_dicom_series(tmp_path / "d", img, np.diag([-1.0, -1.0, 2.0, 1.0]), shuffle=False)
    bad = tmp_path / "d" / which
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, bad.stat().st_size, dtype=np.uint8).tobytes())
    if which == "IM0003":  # a gap in the middle: the series cannot be read, the bad file is named
        with pytest.raises(DataError, match="not a readable DICOM file") as err:
            read_image(tmp_path / "d")
        assert err.value.path == str(bad)
        assert "missing slices" not in str(err.value)
    else:  # the last slice: the rest is a regular series; read with a warning naming the file
        with caplog.at_level(logging.WARNING):
            data, _, info = read_image(tmp_path / "d")
        assert data.shape == (8, 8, 5) and info["unreadable_files"] == [str(bad)]
        assert str(bad) in caplog.text
        _, meta = preprocess_image(str(tmp_path / "d"), PARAMS)
        assert any(w["file"] == str(bad) and "not a readable DICOM file" in w["problem"] for w in meta["warnings"])


# ---------------------------------------------------------------------------------------------------------
# prepare: every bad case listed, constant images


def test_prepare_lists_every_bad_case_with_its_reason(tmp_path, dh, caplog):
    img, lab = dh.phantom((12, 10, 8))
    a = dh.AFFINES["RAS"]
    root = tmp_path / "raw"
    dh.write_nifti(root / "good.nii.gz", img, a)
    dh.write_nifti(root / "flat.nii.gz", img[:, :, :1], a)
    dh.write_nifti(root / "shape.nii.gz", img, a)
    dh.write_nifti(root / "shape_seg.nii.gz", lab[:, :, 1:], a)
    dh.write_nifti(root / "orphan_seg.nii.gz", lab, a)
    (root / "trunc.nii.gz").write_bytes(open(root / "good.nii.gz", "rb").read()[:200])
    with caplog.at_level(logging.WARNING, logger="mambamim.data.prepare"):
        rep = prepare_dataset(root, tmp_path / "cache", PARAMS, progress=False)
    assert rep.prepared == ["good"]
    problems = {f["case"]: f["problem"] for f in rep.failed}
    assert set(problems) == {"flat", "shape", "orphan_seg", "trunc"}
    # one warning lists them all, each with its file and reason (finetune / evaluate show it)
    listing = [r.getMessage() for r in caplog.records if "4 of 5 cases failed" in r.getMessage()]
    assert len(listing) == 1, [r.getMessage() for r in caplog.records]
    for cid, problem in problems.items():
        assert f"{cid}: " in listing[0] and problem in listing[0]


def test_constant_image_is_flagged_and_left_out(tmp_path, dh):
    img, lab = dh.phantom((12, 10, 8))
    a = dh.AFFINES["RAS"]
    root = tmp_path / "raw"
    dh.write_nifti(root / "good.nii.gz", img, a)
    dh.write_nifti(root / "flat_grey.nii.gz", np.full((12, 10, 8), 40, np.int16), a)
    dh.write_nifti(root / "all_air.nii.gz", np.full((12, 10, 8), -1000, np.int16), a)
    rep = prepare_dataset(root, tmp_path / "cache", PARAMS, progress=False)
    assert rep.prepared == ["good"]
    excluded = {e["case"]: e for e in rep.excluded}
    assert set(excluded) == {"flat_grey", "all_air"}
    assert "constant image (every voxel is 40)" in excluded["flat_grey"]["problem"]
    assert "constant image (every voxel is -1000)" in excluded["all_air"]["problem"]
    assert excluded["all_air"]["file"] == str(root / "all_air.nii.gz")
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert {e["case"] for e in report["excluded"]} == {"flat_grey", "all_air"}
    index = json.loads((tmp_path / "cache" / "dataset.json").read_text())
    assert [c["id"] for c in index["cases"]] == ["good"]
    # rerun: still left out, and kept on request
    rep2 = prepare_dataset(root, tmp_path / "cache", PARAMS, progress=False)
    assert rep2.skipped == ["good"] and {e["case"] for e in rep2.excluded} == {"flat_grey", "all_air"}
    rep3 = prepare_dataset(root, tmp_path / "cache2", PARAMS, progress=False, keep_constant=True)
    assert sorted(rep3.prepared) == ["all_air", "flat_grey", "good"] and not rep3.excluded
    assert any(w["case"] == "flat_grey" and "constant image" in w["problem"] for w in rep3.warnings)


def test_num_training_mismatch_is_a_warning(tmp_path, dh, make_json):
    img, lab = dh.phantom((12, 10, 8))
    root = tmp_path / "Dataset002_X"
    dh.write_nifti(root / "imagesTr" / "a_0000.nii.gz", img, dh.AFFINES["RAS"])
    dh.write_nifti(root / "labelsTr" / "a.nii.gz", lab, dh.AFFINES["RAS"])
    make_json(root / "dataset.json", {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "b": 2},
                                      "numTraining": 3, "file_ending": ".nii.gz"})
    rep = prepare_dataset(root, tmp_path / "cache", PARAMS, progress=False)
    assert rep.prepared == ["a"]
    assert any("numTraining is 3 but 1 training cases were found" in w["problem"] for w in rep.warnings)


# ---------------------------------------------------------------------------------------------------------
# case ids and the pairing rule


def test_non_ascii_case_ids_are_kept(tmp_path, dh):
    img, lab = dh.phantom((12, 10, 8))
    a = dh.AFFINES["RAS"]
    names = ["Müller_01", "患者_7", "Ødegård-ß"]
    for n in names:
        dh.write_nifti(tmp_path / "raw" / f"{n}.nii.gz", img, a)
        dh.write_nifti(tmp_path / "raw" / f"{n}_seg.nii.gz", lab, a)
    dh.write_nifti(tmp_path / "raw" / "Ärzte" / "image.nii.gz", img, a)
    assert sorted(c.case_id for c in discover_cases(tmp_path / "raw")) == sorted(names + ["Ärzte"])
    rep = prepare_dataset(tmp_path / "raw", tmp_path / "cache", PARAMS, progress=False)
    assert sorted(rep.prepared) == sorted(names + ["Ärzte"]) and not rep.failed
    for n in names:
        assert load_case(tmp_path / "cache", n)["label"] is not None
    # unsafe characters in a file system path are still replaced
    assert discover_cases(dh.write_nifti(tmp_path / "odd" / "a b:c.nii.gz", img, a))[0].case_id == "a_b_c"


def test_an_image_named_like_a_label_is_not_mistaken_for_one(tmp_path, dh):
    img, lab = dh.phantom((12, 10, 8))
    a = dh.AFFINES["RAS"]
    root = tmp_path / "raw"
    dh.write_nifti(root / "scan_label.nii.gz", img, a)  # a CT whose name ends in _label, nothing to pair with
    dh.write_nifti(root / "lonely_seg.nii.gz", lab, a)  # a label map without its image
    dh.write_nifti(root / "x.nii.gz", img, a)  # a pair
    dh.write_nifti(root / "x_label.nii.gz", lab, a)
    cases = {c.case_id: c for c in discover_cases(root)}
    assert set(cases) == {"scan_label", "lonely_seg", "x"}
    assert cases["x"].label_path.endswith("x_label.nii.gz")
    rep = prepare_dataset(root, tmp_path / "cache", PARAMS, progress=False)
    assert sorted(rep.prepared) == ["scan_label", "x"]
    fail = {f["case"]: f for f in rep.failed}
    assert set(fail) == {"lonely_seg"}
    assert "looks like a label map" in fail["lonely_seg"]["problem"]
    assert "no image" in fail["lonely_seg"]["problem"]


# ---------------------------------------------------------------------------------------------------------
# labels in world space


def test_las_label_on_lps_image_of_the_same_grid_is_reordered(tmp_path, dh):
    img, lab = dh.phantom((16, 12, 10))
    a = LPS_AFF
    ip = dh.write_nifti(tmp_path / "img.nii.gz", img, a)
    ref = preprocess_label(dh.write_nifti(tmp_path / "ref.nii.gz", lab, a), preprocess_image(ip, PARAMS)[1])
    las = _flip_axis(a, lab.shape, 1)  # L P S -> L A S, same voxels in the world
    permuted = las[:, [2, 0, 1, 3]]  # and the axes stored in another order
    for name, arr, aff in (("las", lab[:, ::-1], las),
                           ("perm", np.transpose(lab[:, ::-1], (2, 0, 1)), permuted)):
        p = dh.write_nifti(tmp_path / f"{name}.nii.gz", np.ascontiguousarray(arr), aff)
        out = preprocess_label(p, preprocess_image(ip, PARAMS)[1])
        assert np.array_equal(out, ref), name


def test_label_on_another_grid_names_what_differs(tmp_path, dh):
    img, lab = dh.phantom((16, 12, 10))
    a = LPS_AFF
    ip = dh.write_nifti(tmp_path / "img.nii.gz", img, a)
    _, meta = preprocess_image(ip, PARAMS)
    flipped_about_origin = a @ np.diag([1.0, -1, 1, 1])  # LAS, but not the image's voxels
    shifted = a.copy()
    shifted[:3, 3] += [0.0, 0.0, 3.0]
    spacing = a @ np.diag([1.0, 1.0, 1.5, 1.0])
    nearly = a.copy()
    nearly[:3, 3] += 1e-4  # float32 round-off of a converter: accepted
    for name, aff, msg in (("flip", flipped_about_origin, "origin"), ("shift", shifted, "origin"),
                           ("spacing", spacing, "spacing")):
        p = dh.write_nifti(tmp_path / f"{name}.nii.gz", lab, aff)
        with pytest.raises(DataError, match="not on the image's voxel grid") as err:
            preprocess_label(p, json.loads(json.dumps(meta)))
        assert msg in str(err.value) and err.value.path == p
    preprocess_label(dh.write_nifti(tmp_path / "nearly.nii.gz", lab, nearly), json.loads(json.dumps(meta)))


# ---------------------------------------------------------------------------------------------------------
# DICOM series + NIfTI label map


@pytest.mark.parametrize("layout", ["beside", "subfolder"])
def test_dicom_series_with_nifti_label_in_a_case_folder(tmp_path, dh, layout):
    img, lab = dh.phantom((16, 12, 10))
    root = tmp_path / "raw"
    for k, cid in enumerate(("patient1", "patient2")):
        series = root / cid / ("DICOM" if layout == "subfolder" else "")
        dh.write_dicom_series(series, img, LPS_AFF)
        # the label as a converter would write it: LAS (y flipped), same world grid
        las = _flip_axis(LPS_AFF, lab.shape, 1)
        dh.write_nifti(root / cid / ("label.nii.gz" if k == 0 else "segmentation.nii.gz"),
                       np.ascontiguousarray(lab[:, ::-1]), las)
    ds = discover_dataset(root)
    assert [c.case_id for c in ds.cases] == ["patient1", "patient2"], [c.to_dict() for c in ds.cases]
    for c in ds.cases:
        assert c.error is None and "#" in c.image_paths[0] and c.label_path.endswith(".nii.gz")
    rep = prepare_dataset(root, tmp_path / "cache", PARAMS, progress=False)
    assert rep.prepared == ["patient1", "patient2"] and not rep.failed, rep.failed
    nii = dh.write_nifti(tmp_path / "ref" / "img.nii.gz", img, LPS_AFF)
    ref_img, meta = preprocess_image(nii, PARAMS)
    ref_lab = preprocess_label(dh.write_nifti(tmp_path / "ref" / "lab.nii.gz", lab, LPS_AFF), meta)
    case = load_case(tmp_path / "cache", "patient1", mmap=False)
    assert np.array_equal(case["label"], ref_lab)
    assert np.abs(case["image"] - ref_img).max() < 1e-5


def test_manifest_lists_images_and_labels_of_any_layout(tmp_path, dh):
    img, lab = dh.phantom((16, 12, 10))
    a = dh.AFFINES["RAS"]
    dh.write_dicom_series(tmp_path / "scans" / "s1" / "series", img, LPS_AFF)
    dh.write_nifti(tmp_path / "masks" / "s1.nii.gz", lab, LPS_AFF)
    dh.write_nifti(tmp_path / "elsewhere" / "ct_label.nii.gz", img, a)
    dh.write_nifti(tmp_path / "masks" / "two.nii.gz", lab, a)
    dh.write_nifti(tmp_path / "nolabel.nii.gz", img, a)
    man = tmp_path / "cases.csv"
    man.write_text("case,image,label,split\n"
                   "s1,scans/s1/series,masks/s1.nii.gz,train\n"
                   f"two,{tmp_path / 'elsewhere' / 'ct_label.nii.gz'},masks/two.nii.gz,val\n"
                   "three,nolabel.nii.gz,,test\n"
                   "four,missing.nii.gz,,\n")
    ds = discover_dataset(man)
    assert ds.kind == "manifest"
    cases = {c.case_id: c for c in ds.cases}
    assert [c.case_id for c in ds.cases] == ["s1", "two", "three", "four"]
    assert cases["s1"].split == "train" and cases["two"].split == "val" and cases["three"].label_path is None
    assert "does not exist" in cases["four"].error and cases["four"].error_path == str(tmp_path / "missing.nii.gz")
    rep = prepare_dataset(man, tmp_path / "cache", PARAMS, progress=False)
    assert rep.prepared == ["s1", "two", "three"] and [f["case"] for f in rep.failed] == ["four"]
    assert load_case(tmp_path / "cache", "s1")["label"].max() == 2
    # a manifest without an image column is a named error
    bad = tmp_path / "bad.csv"
    bad.write_text("path,mask\na.nii.gz,b.nii.gz\n")
    with pytest.raises(DataError, match="'image' column") as err:
        discover_dataset(bad)
    assert err.value.path == str(bad)


@pytest.fixture
def read_only(monkeypatch):
    from _readonly import make_read_only, restore

    made = []

    def make(path):
        made.append(make_read_only(path, monkeypatch))
        return made[-1]

    yield make
    for p in made:
        restore(p)
