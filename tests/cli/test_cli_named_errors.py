"""The CLI names every bad input in one line, exits non-zero and prints no traceback (issue 18 item 3):
--out a file or read-only for every command that writes a folder, a cached .npy truncated or deleted under
finetune, and a batch (prepare, finetune on a raw folder) lists each bad case with its reason."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from _cli_toys import phantom_hu, write_nifti
from _readonly import make_read_only, restore
from mambamim.cli.main import main

TINY = ["--size", "tiny", "--crop", "32", "--batch-size", "1", "--num-crops", "1", "--workers", "0",
        "--device", "cpu", "--no-progress", "--log-every", "1"]
AFF = np.diag([4.0, 4.0, 4.0, 1.0])


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def raw_and_cache(tmp_path_factory):
    """Two labeled phantoms (raw NIfTI) and their cache (8 mm voxels, padded to 32^3)."""
    root = tmp_path_factory.mktemp("named")
    (root / "raw").mkdir()
    for k in range(2):
        img = phantom_hu((12, 12, 10), seed=k)
        write_nifti(root / "raw" / f"p{k}.nii.gz", img, AFF)
        write_nifti(root / "raw" / f"p{k}_seg.nii.gz", (img > 100).astype(np.uint8), AFF)
    assert main(["data", "prepare", "--input", str(root / "raw"), "--out", str(root / "cache"), "--spacing", "8",
                 "--min-size", "32", "--no-progress"]) == 0
    return root / "raw", root / "cache"


def _commands(raw, cache, out):
    return {
        "data prepare": ["data", "prepare", "--input", str(raw), "--out", str(out), "--no-progress"],
        "data synth": ["data", "synth", "--out", str(out), "--num", "1"],
        "pretrain": ["pretrain", "--data", str(cache), "--out", str(out), *TINY, "--steps", "1"],
        "finetune": ["finetune", "--data", str(cache), "--out", str(out), *TINY, "--iterations", "1"],
        "predict": ["predict", "--checkpoint", str(cache / "dataset.json"), "--input", str(raw), "--output", str(out)],
        "evaluate": ["evaluate", "--checkpoint", str(cache / "dataset.json"), "--data", str(cache), "--out",
                     str(out)],
    }


@pytest.mark.parametrize("command", ["data prepare", "data synth", "pretrain", "finetune", "predict", "evaluate"])
def test_out_is_a_file(raw_and_cache, tmp_path, capsys, command):
    raw, cache = raw_and_cache
    out = tmp_path / "taken"
    out.write_text("a file")
    capsys.readouterr()
    assert main(_commands(raw, cache, out)[command]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"mambamim {command}: {out}: ") and "is a file, not a folder" in line, line
    assert out.read_text() == "a file"


@pytest.mark.parametrize("command", ["data prepare", "pretrain", "finetune", "predict"])
@pytest.mark.parametrize("inside", [False, True])
def test_out_is_read_only(raw_and_cache, tmp_path, capsys, monkeypatch, command, inside):
    raw, cache = raw_and_cache
    ro = make_read_only(tmp_path / "ro", monkeypatch)
    out = ro / "new" if inside else ro
    try:
        capsys.readouterr()
        assert main(_commands(raw, cache, out)[command]) == 1
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"mambamim {command}: {out}: ") and "not writable" in line, line
        assert not (ro / "new").exists()
    finally:
        restore(ro)


def test_an_os_error_inside_a_command_is_one_line(monkeypatch, capsys):
    import mambamim.cli.cmd_data_synth as synth

    def boom(args):
        raise PermissionError(13, "Permission denied", "/somewhere/file.nii.gz")

    monkeypatch.setattr(synth, "run", boom)
    assert main(["data", "synth", "--out", "/tmp/x-never-written"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line == "mambamim data synth: /somewhere/file.nii.gz: Permission denied"


def test_finetune_names_a_truncated_cached_npy(raw_and_cache, tmp_path, capsys):
    import shutil

    _, cache = raw_and_cache
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    f = broken / "cases" / "p1" / "image.npy"
    f.write_bytes(f.read_bytes()[:-1000])
    capsys.readouterr()
    assert main(["finetune", "--data", str(broken), "--out", str(tmp_path / "ft"), *TINY, "--iterations", "1",
                 "--val-every", "0", "--fold", "-1"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert str(f) in line and "case 'p1'" in line and "truncated" in line and "mambamim data prepare" in line


def test_prepare_cli_lists_each_bad_case(raw_and_cache, tmp_path, capsys):
    raw, _ = raw_and_cache
    import shutil

    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b not really")
    write_nifti(src / "flat.nii.gz", np.zeros((12, 12, 10), np.int16), AFF)
    write_nifti(src / "p0_seg.nii.gz", np.zeros((12, 12, 9), np.uint8), AFF)  # wrong shape now
    capsys.readouterr()
    assert main(["data", "prepare", "--input", str(src), "--out", str(tmp_path / "c"), "--spacing", "8",
                 "--min-size", "32", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert any(ln.startswith(f"FAILED broken: {src / 'broken.nii.gz'}: ") for ln in lines), err
    assert any(ln.startswith(f"FAILED p0: {src / 'p0_seg.nii.gz'}: label shape") for ln in lines), err
    assert any(ln.startswith(f"LEFT OUT flat: {src / 'flat.nii.gz'}: constant image (every voxel is 0)")
               for ln in lines), err
    assert sum("broken" in ln for ln in lines) == 1  # listed once, not again by the log


def test_finetune_on_a_raw_folder_lists_each_bad_case(tmp_path, caplog, capsys):
    # the good cases are unlabeled, so fine-tuning stops (with its own one-line error) right after preparing
    src = tmp_path / "raw"
    src.mkdir()
    for k in range(2):
        write_nifti(src / f"p{k}.nii.gz", phantom_hu((12, 12, 10), seed=k), AFF)
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b not really")
    write_nifti(src / "thin.nii.gz", np.zeros((12, 12, 1), np.int16), AFF)
    with caplog.at_level(logging.WARNING, logger="mambamim.data.prepare"):
        code = main(["finetune", "--data", str(src), "--out", str(tmp_path / "ft"), *TINY, "--iterations", "1",
                     "--val-every", "0", "--fold", "-1"])
    listing = [r.getMessage() for r in caplog.records if "cases failed" in r.getMessage()]
    assert len(listing) == 1, caplog.text
    assert listing[0].startswith("2 of 4 cases failed")
    assert f"  broken: {src / 'broken.nii.gz'}: cannot read NIfTI header" in listing[0]
    assert f"  thin: {src / 'thin.nii.gz'}: 2D image" in listing[0]
    assert code == 1
    _one_line(capsys.readouterr().err)
