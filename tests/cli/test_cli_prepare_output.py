"""``mambamim data prepare`` reports its summary, each failure and each warning once (not also as log lines)."""

from __future__ import annotations

import json
import logging

import numpy as np

from mambamim.cli.main import main

from _cli_toys import phantom_hu, write_nifti

AFF = np.diag([2.0, 2.0, 3.0, 1.0])


def test_prepare_prints_summary_once(tmp_path, capsys, caplog):
    nn = tmp_path / "nn"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    for i in range(2):
        hu = phantom_hu((20, 18, 10), seed=i)
        write_nifti(nn / "imagesTr" / f"case{i}_0000.nii.gz", hu, AFF)
        write_nifti(nn / "labelsTr" / f"case{i}.nii.gz", (hu > 37.5).astype(np.uint8), AFF)
    (nn / "imagesTr" / "bad_0000.nii.gz").write_bytes(b"junk")
    # two dataset warnings: a non-CT channel and a wrong numTraining
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "bright": 1},
                                                 "numTraining": 5, "file_ending": ".nii.gz"}))
    caplog.set_level(logging.INFO)
    rc = main(["data", "prepare", "--input", str(nn), "--out", str(tmp_path / "cache"), "--min-size", "16",
               "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    everything = captured.out + captured.err + caplog.text
    assert everything.count("2 prepared, 0 skipped") == 1
    assert captured.out.count("2 prepared, 0 skipped") == 1  # the summary is on stdout
    assert everything.count("numTraining is 5") == 1
    assert everything.count("declared as not CT") == 1
    assert everything.count("bad_0000.nii.gz") == 1
    assert "FAILED bad:" in captured.err


def test_library_call_still_logs_summary(tmp_path, caplog):
    from mambamim.data.prepare import prepare_dataset
    from mambamim.data.preprocess import PreprocessParams

    raw = tmp_path / "raw"
    raw.mkdir()
    write_nifti(raw / "a.nii.gz", phantom_hu((20, 18, 10)), AFF)
    caplog.set_level(logging.INFO)
    prepare_dataset(raw, tmp_path / "cache", PreprocessParams(min_size=[16]), progress=False)
    assert caplog.text.count("1 prepared, 0 skipped") == 1
