"""``mambamim predict`` never replaces an output silently: existing outputs are refused (the other
inputs still run, exit status 1) unless --overwrite replaces them or --skip-existing skips them."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mambamim.cli.main import main

from _cli_toys import phantom_hu, write_nifti

AFFINE = np.array([[2.0, 0, 0, 10], [0, 2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
STALE = b"an earlier label map"


@pytest.fixture
def batch(tmp_path, toy_segmenter):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")  # the toy loader only checks that it exists
    inputs = tmp_path / "in"
    inputs.mkdir()
    hu = {name: phantom_hu((20, 18, 12), seed=i) for i, name in enumerate(("a", "b"))}
    for name, vol in hu.items():
        write_nifti(inputs / f"{name}.nii.gz", vol, AFFINE)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_seg.nii.gz").write_bytes(STALE)  # a's output is already there, b's is not
    base = ["predict", "--checkpoint", str(ckpt), "--input", str(inputs), "--output", str(out), "--device", "cpu",
            "--no-progress"]
    return base, out, hu


def test_predict_refuses_an_existing_output_and_does_the_others(batch, capsys):
    base, out, hu = batch
    assert main(base) == 1
    captured = capsys.readouterr()
    assert (out / "a_seg.nii.gz").read_bytes() == STALE  # untouched
    assert f"{out / 'a_seg.nii.gz'} already exists" in captured.err and "--overwrite" in captured.err
    assert "1 refused" in captured.out and "wrote 1 of 2" in captured.out
    seg = np.asarray(nib.load(out / "b_seg.nii.gz").dataobj)  # the batch carried on
    np.testing.assert_array_equal(seg.astype(bool), hu["b"] > 37.5)


def test_predict_overwrite_replaces_it(batch, capsys):
    base, out, hu = batch
    assert main([*base, "--overwrite"]) == 0
    assert "wrote 2 of 2" in capsys.readouterr().out
    seg = np.asarray(nib.load(out / "a_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg.astype(bool), hu["a"] > 37.5)


def test_predict_skip_existing_skips_it(batch, capsys):
    base, out, hu = batch
    assert main([*base, "--skip-existing"]) == 0
    captured = capsys.readouterr()
    assert (out / "a_seg.nii.gz").read_bytes() == STALE
    assert "skipped" in captured.err and str(out / "a_seg.nii.gz") in captured.err
    assert "wrote 1 of 2" in captured.out and "1 skipped" in captured.out
    assert (out / "b_seg.nii.gz").is_file()
    # everything there now: a rerun skips both and succeeds
    assert main([*base, "--skip-existing"]) == 0
    assert "wrote 0 of 2" in capsys.readouterr().out


def test_predict_overwrite_and_skip_existing_exclude_each_other(batch, capsys):
    base, out, _ = batch
    with pytest.raises(SystemExit) as info:
        main([*base, "--overwrite", "--skip-existing"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert (out / "a_seg.nii.gz").read_bytes() == STALE
