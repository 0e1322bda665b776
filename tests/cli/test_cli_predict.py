"""``mambamim predict`` end to end on CPU with a toy thresholding segmenter."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mambamim.cli.main import main

from _cli_toys import phantom_hu, toy_info, write_dicom_series, write_nifti

REAL_CT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ct_abdomen_3mm"

AFFINES = {
    "ras": np.array([[2.0, 0, 0, 10], [0, 2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]]),
    "lps": np.array([[-2.0, 0, 0, 40], [0, -2.0, 0, 30], [0, 0, 3.0, -7], [0, 0, 0, 1]]),
    # data axes (S, L, A): a permutation and a flip
    "sla": np.array([[0, -2.0, 0, 12], [0, 0, 2.0, -3], [3.0, 0, 0, 1], [0, 0, 0, 1]]),
}
SHAPES = {"ras": (22, 18, 12), "lps": (22, 18, 12), "sla": (12, 22, 18)}


def test_predict_geometry_and_voxels(tmp_path, toy_segmenter, capsys):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"stand-in")  # the toy loader only checks that it exists
    inputs = tmp_path / "in"
    inputs.mkdir()
    hu = {}
    for i, (name, aff) in enumerate(AFFINES.items()):
        hu[name] = phantom_hu(SHAPES[name], seed=i)
        write_nifti(inputs / f"{name}.nii.gz", hu[name], aff)
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", str(inputs), "--output", str(out),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert "wrote 3 of 3" in capsys.readouterr().out
    for name, aff in AFFINES.items():
        img = nib.load(out / f"{name}_seg.nii.gz")
        assert img.shape == SHAPES[name]
        np.testing.assert_allclose(img.affine, aff, atol=1e-5)
        assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(aff)
        seg = np.asarray(img.dataobj)
        expected = hu[name] > 37.5  # threshold 0.5 of the [-175, 250] window
        assert expected.sum() > 20
        np.testing.assert_array_equal(seg.astype(bool), expected)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # atomic writes leave no temp files


def test_predict_compile_flag_wraps_the_network(tmp_path, toy_segmenter, monkeypatch, capsys):
    from mambamim import inference

    wrapped = []
    real = inference.compile_segmenter
    monkeypatch.setattr(inference, "compile_segmenter", lambda m: wrapped.append(m) or real(m))
    monkeypatch.setattr("torch.compile", lambda model: model)  # the wrapper's plumbing, not Inductor
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    hu = phantom_hu((20, 20, 12))
    (tmp_path / "in").mkdir()
    write_nifti(tmp_path / "in" / "a.nii.gz", hu, AFFINES["ras"])
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--output", str(out),
               "--device", "cpu", "--no-progress", "--compile"])
    assert rc == 0 and len(wrapped) == 1
    seg = np.asarray(nib.load(out / "a_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg.astype(bool), hu > 37.5)


def test_predict_reports_bad_files_and_keeps_going(tmp_path, toy_segmenter, capsys):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    good = write_nifti(tmp_path / "good.nii.gz", phantom_hu((20, 20, 12)), AFFINES["ras"])
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    four_d = write_nifti(tmp_path / "fourd.nii.gz", np.zeros((8, 8, 8, 3), np.int16), AFFINES["ras"])
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", good, str(corrupt), four_d, str(tmp_path / "missing.nii.gz"),
               "--output", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert (out / "good_seg.nii.gz").exists()
    err = capsys.readouterr()
    text = err.err + err.out
    assert "corrupt.nii.gz" in text and "fourd.nii.gz" in text and "missing.nii.gz" in text
    assert "4D" in text
    assert "wrote 1 of 4" in err.out
    # all fail -> non-zero
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", str(corrupt), "--output", str(out),
               "--device", "cpu", "--no-progress"])
    assert rc == 1


def test_predict_dicom_series(tmp_path, toy_segmenter):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    hu = phantom_hu((22, 18, 12), seed=5)
    aff = AFFINES["lps"]  # DICOM's native patient orientation
    write_dicom_series(tmp_path / "patient1" / "series", hu, aff)
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "patient1"), "--output",
               str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert rc == 0
    (seg_path,) = list((tmp_path / "out").glob("*_seg.nii.gz"))
    img = nib.load(seg_path)
    assert img.shape == hu.shape
    np.testing.assert_allclose(img.affine, aff, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj).astype(bool), hu > 37.5)


def test_predict_checkpoint_errors(tmp_path, capsys):
    img = write_nifti(tmp_path / "a.nii.gz", phantom_hu((20, 20, 12)), AFFINES["ras"])
    rc = main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), "--input", img, "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage, not a torch file")
    rc = main(["predict", "--checkpoint", str(bad), "--input", img, "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "bad.pt" in capsys.readouterr().err


@pytest.mark.skipif(not (REAL_CT / "image.nii.gz").exists(), reason="real CT sample not present")
def test_predict_real_ct_geometry(tmp_path, toy_segmenter):
    toy_segmenter["info"] = toy_info(spacing=(3.0, 3.0, 1.5), roi=64)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    out = tmp_path / "out"
    src = REAL_CT / "image.nii.gz"
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(out),
               "--device", "cpu", "--no-progress", "--overlap", "0.25"])
    assert rc == 0
    ref = nib.load(src)
    seg_img = nib.load(out / "image_seg.nii.gz")
    assert seg_img.shape == ref.shape
    np.testing.assert_allclose(seg_img.affine, ref.affine, atol=1e-4)
    seg = np.asarray(seg_img.dataobj).astype(bool)
    expected = np.asarray(ref.dataobj) > 37.5  # 3 mm -> 1.5 mm along z is an integer upsampling: exact round trip
    np.testing.assert_array_equal(seg, expected)


def test_predict_read_ahead_is_passed_and_checked(tmp_path, toy_segmenter, capsys):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    (tmp_path / "in").mkdir()
    hu = {}
    for i in range(3):
        hu[i] = phantom_hu((20, 20, 12), seed=i)
        write_nifti(tmp_path / "in" / f"c{i}.nii.gz", hu[i], AFFINES["ras"])
    base = ["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--device", "cpu", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "out"), "--read-ahead", "3"]) == 0
    for i in range(3):
        seg = np.asarray(nib.load(tmp_path / "out" / f"c{i}_seg.nii.gz").dataobj)
        np.testing.assert_array_equal(seg.astype(bool), hu[i] > 37.5)
    for bad, why in (("0", "must be at least 1, got 0"), ("two", "must be a whole number, got 'two'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main([*base, "--output", str(tmp_path / "out0"), "--read-ahead", bad])
        assert stop.value.code == 2
        assert f"argument --read-ahead: {why}" in capsys.readouterr().err
    assert not (tmp_path / "out0").exists()
