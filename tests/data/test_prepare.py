"""prepare_dataset / `mambamim data prepare`: cache layout, bad-input report, resume, workers, exit codes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mambamim.cli.main import main as cli_main
from mambamim.data.cache import load_cache_index, load_case
from mambamim.data.errors import DataError
from mambamim.data.prepare import prepare_dataset
from mambamim.data.preprocess import PreprocessParams, restore_to_original

PARAMS = PreprocessParams(spacing=2.0, min_size=16, crop_margin=2)


@pytest.fixture
def messy(tmp_path, dh, make_json):
    """A Decathlon-style dataset: 3 good cases (one small -> padded) and one of each bad input."""
    root = tmp_path / "Task99_Messy"
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    img, lab = dh.phantom((24, 20, 16))
    small_img, small_lab = dh.phantom((12, 10, 8))
    entries, bad = [], {}

    def add(cid, image, label, img_aff=a, lab_aff=a):
        ip = dh.write_nifti(root / "imagesTr" / f"{cid}.nii.gz", image, img_aff)
        lp = dh.write_nifti(root / "labelsTr" / f"{cid}.nii.gz", label, lab_aff) if label is not None else None
        entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        return ip, lp

    add("good_a", img, lab)
    add("good_b", img[::-1].copy(), lab[::-1].copy())
    add("good_small", small_img, small_lab)
    ip, _ = add("trunc", img, lab)
    noisy = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40)).astype(np.int16)
    dh.write_nifti(ip, noisy, a)
    raw = open(ip, "rb").read()
    open(ip, "wb").write(raw[: len(raw) // 2])
    bad["trunc"] = (ip, "truncated or corrupt")
    bad["flat"] = (add("flat", img[:, :, 0], lab[:, :, 0])[0], "2D image")
    bad["fourd"] = (add("fourd", np.stack([img] * 3, -1), lab)[0], "4D image")
    bad["shape"] = (add("shape", img, lab[:, :, 1:])[1], "label shape")
    shifted = a.copy()
    shifted[:3, 3] = 5.0
    bad["affine"] = (add("affine", img, lab, a, shifted)[1], "not on the image's voxel grid")
    bad["orient"] = (add("orient", img, lab, a, a @ np.diag([1.0, -1, 1, 1]))[1], "origin")
    bad["values"] = (add("values", img, np.where(lab == 2, 9, lab).astype(np.uint8))[1], "not declared")
    nan = img.astype(np.float32)
    nan[5, 5, 5] = np.inf
    bad["nan"] = (add("nan", nan, lab)[0], "non-finite")
    entries.append({"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/ghost.nii.gz"})
    bad["ghost"] = (str(root / "imagesTr" / "ghost.nii.gz"), "does not exist")
    make_json(root / "dataset.json", {"labels": {"0": "background", "1": "organ", "2": "lesion"},
                                      "modality": {"0": "CT"}, "training": entries, "test": []})
    return root, bad


def test_prepare_messy_dataset(tmp_path, messy):
    root, bad = messy
    out = tmp_path / "cache"
    rep = prepare_dataset(root, out, params=PARAMS, progress=False)
    assert rep.prepared == ["good_a", "good_b", "good_small"] and rep.skipped == []
    assert rep.exit_code() == 0 and rep.exit_code(strict=True) == 1
    report = json.loads((out / "report.json").read_text())
    failed = {f["case"]: f for f in report["failed"]}
    assert set(failed) == set(bad)
    for cid, (path, msg) in bad.items():
        assert os.path.samefile(failed[cid]["file"], path) if os.path.exists(path) else failed[cid]["file"] == path
        assert msg in failed[cid]["problem"], (cid, failed[cid])
    assert [w["case"] for w in report["warnings"]] == ["good_small"]
    assert "smaller than min_size" in report["warnings"][0]["problem"]

    index = load_cache_index(out)
    assert index["format"] == "mambamim-cache" and index["version"] == 1
    assert index["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert PreprocessParams.from_dict(index["preprocessing"]) == PARAMS
    assert [c["id"] for c in index["cases"]] == ["good_a", "good_b", "good_small"]
    for c in index["cases"]:
        assert c["image"] == f"cases/{c['id']}/image.npy" and c["label"] == f"cases/{c['id']}/label.npy"
        assert c["meta"] == f"cases/{c['id']}/meta.json"
        img = np.load(out / c["image"], mmap_mode="r")
        lab = np.load(out / c["label"], mmap_mode="r")
        assert isinstance(img, np.memmap) and img.dtype == np.float32 and list(img.shape) == c["shape"]
        assert lab.dtype == np.uint8 and lab.shape == img.shape[1:] and set(np.unique(lab)) <= {0, 1, 2}
        assert 0 <= img.min() and img.max() <= 1
    case = load_case(out, "good_small")
    assert case["image"].shape[1:] == (16, 16, 16) and case["label"] is not None
    back, _ = restore_to_original(np.asarray(case["label"]), case["meta"])
    src = np.asarray(__import__("nibabel").load(case["meta"]["source"]["label"]).dataobj)
    assert np.array_equal(back, src)
    assert not [p for p in out.rglob(".tmp-*")]  # no temp files left
    with pytest.raises(DataError, match="not in the cache"):
        load_case(out, "trunc")


def test_rerun_skips_finished_and_redoes_interrupted(tmp_path, dh):
    src = tmp_path / "in"
    for i in range(3):
        img, lab = dh.phantom((20, 16, 12), seed=i)
        dh.write_nifti(src / f"ct{i}.nii.gz", img, np.eye(4))
    out = tmp_path / "cache"
    first = prepare_dataset(src, out, params=PARAMS, progress=False)
    assert first.prepared == ["ct0", "ct1", "ct2"]
    ref = np.load(out / "cases" / "ct1" / "image.npy")
    mtime = os.path.getmtime(out / "cases" / "ct0" / "image.npy")
    # simulate a run killed after writing ct1's image but before its meta.json
    os.unlink(out / "cases" / "ct1" / "meta.json")
    again = prepare_dataset(src, out, params=PARAMS, progress=False)
    assert again.skipped == ["ct0", "ct2"] and again.prepared == ["ct1"]
    assert os.path.getmtime(out / "cases" / "ct0" / "image.npy") == mtime
    assert np.array_equal(np.load(out / "cases" / "ct1" / "image.npy"), ref)
    assert [c["id"] for c in load_cache_index(out)["cases"]] == ["ct0", "ct1", "ct2"]
    assert load_cache_index(out)["labels"] is None and load_cache_index(out)["cases"][0]["label"] is None
    # an edited input is redone
    img, _ = dh.phantom((20, 16, 12), seed=7)
    dh.write_nifti(src / "ct2.nii.gz", img, np.eye(4))
    os.utime(src / "ct2.nii.gz", (1e9, 1e9))
    assert prepare_dataset(src, out, params=PARAMS, progress=False).prepared == ["ct2"]
    # other parameters: everything is redone
    other = prepare_dataset(src, out, params=PreprocessParams(spacing=4.0, min_size=8), progress=False)
    assert other.prepared == ["ct0", "ct1", "ct2"] and other.skipped == []


def test_workers_give_same_cache(tmp_path, dh):
    src = tmp_path / "in"
    for i in range(3):
        img, lab = dh.phantom((20, 16, 12), seed=i)
        dh.write_nifti(src / f"ct{i}.nii.gz", img, np.eye(4))
        dh.write_nifti(src / f"ct{i}_seg.nii.gz", lab, np.eye(4))
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    r1 = prepare_dataset(src, tmp_path / "c1", params=PARAMS, progress=False, workers=1)
    r2 = prepare_dataset(src, tmp_path / "c2", params=PARAMS, progress=False, workers=2)
    assert r1.prepared == r2.prepared == ["ct0", "ct1", "ct2"]
    assert [f["case"] for f in r2.failed] == ["broken"]
    for cid in r1.prepared:
        for name in ("image.npy", "label.npy"):
            assert np.array_equal(np.load(tmp_path / "c1" / "cases" / cid / name),
                                  np.load(tmp_path / "c2" / "cases" / cid / name))
    # labels present but not declared: classes inferred from the values found
    assert load_cache_index(tmp_path / "c2")["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}


def test_nnunet_multichannel_and_dicom_prepare(tmp_path, dh, make_json):
    root = tmp_path / "Dataset002"
    img, lab = dh.phantom((20, 16, 12))
    a = np.diag([-2.0, -2.0, 2.0, 1.0])
    dh.write_nifti(root / "imagesTr" / "c1_0000.nii.gz", img, a)
    dh.write_nifti(root / "imagesTr" / "c1_0001.nii.gz", img + 100, a)
    dh.write_nifti(root / "labelsTr" / "c1.nii.gz", lab, a)
    make_json(root / "dataset.json", {"channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2},
                                      "file_ending": ".nii.gz"})
    rep = prepare_dataset(root, tmp_path / "c", params=PARAMS, progress=False)
    case = load_case(tmp_path / "c", "c1")
    assert rep.prepared == ["c1"] and case["image"].shape[0] == 2
    assert "'1': 'T2'" in rep.warnings[0]["problem"] and "not CT" in rep.warnings[0]["problem"]
    assert np.all(case["image"][1] >= case["image"][0])
    dh.write_dicom_series(tmp_path / "dicom" / "patient1", img, a)
    rep = prepare_dataset(tmp_path / "dicom", tmp_path / "cd", params=PARAMS, progress=False)
    dcm = load_case(tmp_path / "cd", "patient1")
    assert rep.prepared == ["patient1"] and np.allclose(dcm["image"][0], case["image"][0], atol=1e-6)


def test_cli_exit_codes(tmp_path, dh, capsys):
    src = tmp_path / "in"
    img, _ = dh.phantom((20, 16, 12))
    dh.write_nifti(src / "ok.nii.gz", img, np.eye(4))
    dh.write_nifti(src / "flat.nii.gz", img[:, :, 0], np.eye(4))
    base = ["data", "prepare", "--input", str(src), "--spacing", "2", "--min-size", "16", "--no-progress"]
    assert cli_main(base + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "1 prepared" in out.out and "1 failed" in out.out and "flat.nii.gz" in out.err and "2D image" in out.err
    assert cli_main(base + ["--out", str(tmp_path / "a"), "--strict"]) == 1
    assert "1 skipped" in capsys.readouterr().out
    os.unlink(src / "ok.nii.gz")
    assert cli_main(base + ["--out", str(tmp_path / "b")]) == 1
    assert "no case could be prepared" in capsys.readouterr().err
    assert cli_main(["data", "prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["data", "prepare", "--input", str(src), "--out", str(tmp_path / "c"), "--spacing", "1", "2"]) == 2
    dh.write_nifti(src / "ok2.nii.gz", img, np.eye(4))
    assert cli_main(base[:4] + ["--out", str(tmp_path / "d"), "--spacing", "1", "2", "2", "--hu-min", "-100",
                                "--hu-max", "200", "--no-crop-foreground", "--min-size", "8", "--no-progress"]) == 0
    prep = load_cache_index(tmp_path / "d")["preprocessing"]
    assert prep["spacing"] == [1.0, 2.0, 2.0] and prep["hu_min"] == -100 and prep["crop_foreground"] is False
    assert load_case(tmp_path / "d", "ok2")["image"].shape == (1, 20, 8, 8)  # z: 6 padded to 8


def test_real_ct_prepare(tmp_path, dh, real_ct):
    img, lab, a = dh.real_ct_crop(real_ct, size=(32, 28, 24))
    dh.write_nifti(tmp_path / "in" / "ct" / "image.nii.gz", img, a)
    dh.write_nifti(tmp_path / "in" / "ct" / "label.nii.gz", lab, a)
    (tmp_path / "in" / "classes.json").write_text((real_ct / "classes.json").read_text())
    rep = prepare_dataset(tmp_path / "in", tmp_path / "c", params=PreprocessParams(spacing=3.0, min_size=16),
                          progress=False)
    assert rep.prepared == ["ct"] and not rep.failed
    index = load_cache_index(tmp_path / "c")
    assert index["labels"]["1"] == "spleen" and index["labels"]["117"] == "costal_cartilages"
    case = load_case(tmp_path / "c", "ct")
    assert np.array_equal(restore_to_original(np.asarray(case["label"]), case["meta"])[0], lab)
