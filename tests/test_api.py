"""``mambamim.api`` from Python (no CLI): predict_folder, evaluate_run and compare_runs on a tiny cache
with a thresholding stand-in for the checkpoint's network; the lazy top-level names."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import mambamim
from mambamim import api
from mambamim.evaluation.metrics import MetricTable

from _segment_toys import ThresholdSegmenter, write_nifti

AFF = np.diag([6.0, 6.0, 6.0, 1.0])
INFO = {"num_classes": 2, "in_channels": 1, "class_names": ["background", "bright"], "roi_size": 16,
        "preprocessing": {"spacing": [6.0], "hu_min": -175.0, "hu_max": 250.0, "crop_foreground": False,
                          "min_size": [16], "crop_margin": 4}}


def _hu(seed):
    rng = np.random.default_rng(seed)
    vol = np.round(rng.normal(0.0, 15.0, size=(20, 18, 12))).astype(np.int16)
    vol[3:8, 4:9, 2:6] = 200
    return vol


@pytest.fixture
def loader(monkeypatch):
    from mambamim.engine import inference

    def fake(path, device="auto"):
        import os

        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return ThresholdSegmenter().eval(), INFO

    monkeypatch.setattr(inference, "load_segmenter", fake)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Three labeled raw cases; case1's reference is shifted one voxel (Dice < 1)."""
    root = tmp_path_factory.mktemp("raw")
    for i in range(3):
        hu = _hu(i)
        write_nifti(root / f"case{i}.nii.gz", hu, AFF)
        write_nifti(root / f"case{i}_seg.nii.gz", np.roll(hu > 37.5, 1 if i == 1 else 0, axis=0).astype(np.uint8), AFF)
    return root


def test_lazy_names_resolve_without_importing_torch_first():
    code = ("import sys, mambamim; assert 'torch' not in sys.modules; "
            "from mambamim import predict_folder, evaluate_run, compare_runs, reconstruct_file, finetune; "
            "assert predict_folder.__module__ == reconstruct_file.__module__ == 'mambamim.api' and callable(finetune)")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        mambamim.no_such_name  # noqa: B018


def test_predict_folder_writes_on_the_input_grid_and_names_a_missing_checkpoint(tmp_path, raw, loader):
    ckpt = tmp_path / "best.pt"
    with pytest.raises(FileNotFoundError):
        api.predict_folder(ckpt, raw / "case0.nii.gz", tmp_path / "out")
    ckpt.write_bytes(b"x")
    res = api.predict_folder(ckpt, [raw / "case0.nii.gz", raw / "case2.nii.gz"], tmp_path / "out", device="cpu")
    assert [c.status for c in res.cases] == ["written", "written"] and not res.failed
    img = nib.load(res.written[0])
    np.testing.assert_allclose(img.affine, AFF, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj).astype(bool), _hu(0) > 37.5)


def test_evaluate_run_prepares_scores_and_writes(tmp_path, raw, loader):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x")
    plans = []
    res = api.evaluate_run(ckpt, raw, tmp_path / "eval", device="cpu", save_predictions=True,
                           on_start=lambda plan: plans.append((plan, (tmp_path / "eval" / "per_case.csv").exists())))
    (plan, written_before), = plans
    assert not written_before and plan.case_ids == ["case0", "case1", "case2"]
    assert plan.nsd_tolerance_mm == 6.0 and plan.nsd_tolerance_from == "the cache's mean voxel size"
    assert plan.cache == str(tmp_path / "eval" / "cache") and plan.roi == (16, 16, 16)
    dice = {row["case"]: row["dice_bright"] for row in res.table.rows}
    assert dice["case0"] == 1.0 and dice["case2"] == 1.0 and 0.0 < dice["case1"] < 1.0
    assert MetricTable.from_csv(res.paths["per_case"]).case_ids == ["case0", "case1", "case2"]
    assert json.loads(res.paths["summary_json"].read_text())["num_cases"] == 3
    saved = nib.load(tmp_path / "eval" / "predictions" / "case1_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(saved.dataobj).astype(bool), _hu(1) > 37.5)
    # the cache now exists: a second evaluation reads it, on chosen cases only
    again = api.evaluate_run(ckpt, plan.cache, tmp_path / "eval2", cases=["case1"], device="cpu")
    assert again.table.case_ids == ["case1"] and again.table.rows[0]["dice_bright"] == pytest.approx(dice["case1"])
    with pytest.raises(FileNotFoundError, match="data not found"):
        api.evaluate_run(ckpt, tmp_path / "nowhere", tmp_path / "e3")
    with pytest.raises(ValueError, match="not inside a fine-tuning run folder"):
        api.evaluate_run(ckpt, plan.cache, tmp_path / "e4", split="val")


def _eval_folder(folder, cases, dice):
    table = MetricTable(class_names=["bright"])
    for c, d in zip(cases, dice):
        table.add_case(c, {"bright": {"dice": d, "hd95": 1.0, "nsd": d}})
    folder.mkdir(parents=True)
    table.to_csv(folder / "per_case.csv")
    return folder


def test_compare_runs_pairs_the_shared_cases(tmp_path):
    a = _eval_folder(tmp_path / "a", ["c1", "c2", "c3", "c4"], [0.5, 0.6, 0.7, 0.8])
    b = _eval_folder(tmp_path / "b", ["c2", "c3", "c4", "c5"], [0.7, 0.8, 0.9, 0.1])
    res = api.compare_runs(a, b, metrics=["dice"])
    assert res.shared == ["c2", "c3", "c4"] and (res.name_a, res.name_b) == ("a", "b")
    (row,) = [r for r in res.results if r.metric == "dice" and r.class_name == "bright"]
    assert row.mean_a == pytest.approx(0.7) and row.mean_b == pytest.approx(0.8)
    assert res.markdown_path.parent == b and res.json_path.is_file() and not res.evaluated


def test_compare_runs_without_data_names_the_evaluate_command(tmp_path):
    a = _eval_folder(tmp_path / "a" / "eval", ["c1"], [0.5]).parent
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"mambamim evaluate --checkpoint {b} --data CACHE --cases c1"):
        api.compare_runs(a, b)
    assert not (b / "eval").exists()
