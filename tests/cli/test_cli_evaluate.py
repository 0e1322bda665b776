"""``mambamim evaluate`` end to end on CPU: raw labeled NIfTI prepared on the fly, toy segmenter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mambamim.cli.main import main
from mambamim.evaluation.metrics import MetricTable, binary_metrics

from _cli_toys import phantom_hu, toy_info, write_nifti

AFF = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])


def test_evaluate_raw_and_cache(tmp_path, toy_segmenter, capsys):
    toy_segmenter["info"] = toy_info(spacing=(2.0, 2.0, 3.0), roi=32)
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x")
    raw = tmp_path / "raw"
    raw.mkdir()
    expected = {}
    for i in range(3):
        hu = phantom_hu((24, 20, 14), seed=10 + i)
        truth = hu > 37.5
        lab = truth.copy()
        if i == 1:
            lab = np.roll(truth, 1, axis=0)  # a one-voxel shift: Dice < 1, HD95 = 2 mm
        if i == 2:
            lab[:] = False  # the structure is missing from the reference: Dice 0
        write_nifti(raw / f"case{i}.nii.gz", hu, AFF)
        write_nifti(raw / f"case{i}_seg.nii.gz", lab.astype(np.uint8), AFF)
        expected[f"case{i}"] = binary_metrics(truth, lab, (2.0, 2.0, 3.0))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(raw), "--out", str(out),
               "--device", "cpu", "--no-progress", "--save-predictions"])
    assert rc == 0
    import nibabel as nib

    saved = nib.load(out / "predictions" / "case0_seg.nii.gz")  # in the input's own grid
    assert saved.shape == (24, 20, 14)
    np.testing.assert_allclose(saved.affine, AFF, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(saved.dataobj).astype(bool), phantom_hu((24, 20, 14), seed=10) > 37.5)
    printed = capsys.readouterr().out
    assert "| bright |" in printed and "3 case(s)" in printed
    table = MetricTable.from_csv(out / "per_case.csv")
    assert table.case_ids == ["case0", "case1", "case2"]
    for row in table.rows:
        exp = expected[row["case"]]
        assert row["dice_bright"] == pytest.approx(exp["dice"], abs=1e-6)
        assert row["nsd_bright"] == pytest.approx(exp["nsd"], abs=1e-6)
    assert table.rows[0]["dice_bright"] == 1.0 and table.rows[0]["hd95_bright"] == 0.0
    assert 0.0 < table.rows[1]["dice_bright"] < 1.0
    assert table.rows[1]["hd95_bright"] == pytest.approx(expected["case1"]["hd95"], abs=1e-4)
    assert table.rows[2]["dice_bright"] == 0.0 and math.isfinite(table.rows[2]["hd95_bright"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 3
    assert summary["classes"]["bright"]["dice_mean"] == pytest.approx(np.mean([r["dice_bright"] for r in table.rows]))
    assert (out / "summary.md").read_text().startswith("## Evaluation")
    # the prepared cache is reused as --data directly
    out2 = tmp_path / "eval2"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(out / "cache"), "--out", str(out2),
               "--device", "cpu", "--no-progress", "--cases", "case1"])
    assert rc == 0
    t2 = MetricTable.from_csv(out2 / "per_case.csv")
    assert t2.case_ids == ["case1"] and t2.rows[0]["dice_bright"] == pytest.approx(table.rows[1]["dice_bright"])


def test_evaluate_errors(tmp_path, toy_segmenter, capsys):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x")
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "data not found" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    write_nifti(unlabeled / "x.nii.gz", phantom_hu((20, 20, 12)), AFF)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(unlabeled), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "no labeled case" in capsys.readouterr().err
