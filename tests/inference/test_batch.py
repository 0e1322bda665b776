"""``inference.predict_files`` from Python: label maps on each input's own grid, bad files reported while
the others are written, existing outputs refused / skipped / replaced, ``predict_labels`` options."""

from __future__ import annotations

import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from mambamim.inference import WindowOptions, predict_labels
from mambamim.inference.batch import discover_inputs, predict_files

from _segment_toys import ThresholdSegmenter, write_nifti

INFO = {"num_classes": 2, "in_channels": 1, "class_names": ["background", "bright"], "roi_size": 16,
        "preprocessing": {"spacing": [3.0, 3.0, 3.0], "hu_min": -175.0, "hu_max": 250.0, "crop_foreground": False,
                          "min_size": [16, 16, 16], "crop_margin": 2}}
# the HU threshold 37.5 is 0.5 after the [-175, 250] window: the toy below segments HU > 37.5 exactly
AFFINES = {"a": np.diag([3.0, 3.0, 3.0, 1.0]),
           "b": np.array([[-3.0, 0, 0, 40], [0, -3.0, 0, 12], [0, 0, 3.0, -7], [0, 0, 0, 1]])}


def _hu(shape, seed):
    rng = np.random.default_rng(seed)
    vol = rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    vol[2:6, 3:7, 1:4] = 200.0
    vol[-5:-2, 1:3, -3:-1] = 120.0
    return np.round(vol).astype(np.int16)


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    hu = {}
    for k, (name, aff) in enumerate(AFFINES.items()):
        hu[name] = _hu((14, 12, 9), seed=k)
        write_nifti(folder / f"{name}.nii.gz", hu[name], aff)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
    return folder, hu


def test_writes_each_file_on_its_own_grid_and_reports_the_bad_one(tmp_path, inputs):
    folder, hu = inputs
    seen = []
    res = predict_files(ThresholdSegmenter(), INFO, folder, tmp_path / "out", device="cpu", on_case=seen.append)
    assert [c.case_id for c in res.cases] == [c.case_id for c in seen]  # reported as they happen, in order
    assert sorted(res.written) == [str(tmp_path / "out" / f"{n}_seg.nii.gz") for n in ("a", "b")]
    assert [cid for cid, _ in res.failed] == ["broken"]
    assert str(folder / "broken.nii.gz") in res.failed[0][1]
    assert not res.skipped and not res.refused and res.seconds >= 0
    for name, aff in AFFINES.items():
        img = nib.load(tmp_path / "out" / f"{name}_seg.nii.gz")
        assert img.shape == hu[name].shape
        np.testing.assert_allclose(img.affine, aff, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(img.dataobj).astype(bool), hu[name] > 37.5)
    assert not (tmp_path / "out" / "broken_seg.nii.gz").exists()


def test_existing_outputs_are_refused_skipped_or_replaced(tmp_path, inputs):
    folder, hu = inputs
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "a_seg.nii.gz"
    stale.write_bytes(b"earlier")
    res = predict_files(ThresholdSegmenter(), INFO, [folder / "a.nii.gz", folder / "b.nii.gz"], out, device="cpu")
    assert res.refused == [str(stale)] and stale.read_bytes() == b"earlier"
    assert res.written == [str(out / "b_seg.nii.gz")]
    res = predict_files(ThresholdSegmenter(), INFO, folder / "a.nii.gz", out, device="cpu", skip_existing=True)
    assert res.skipped == [str(stale)] and not res.written and stale.read_bytes() == b"earlier"
    res = predict_files(ThresholdSegmenter(), INFO, folder / "a.nii.gz", out, device="cpu", overwrite=True)
    assert res.written == [str(stale)]
    np.testing.assert_array_equal(np.asarray(nib.load(stale).dataobj).astype(bool), hu["a"] > 37.5)
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz"]  # no temp file left
    with pytest.raises(ValueError, match="exclude"):
        predict_files(ThresholdSegmenter(), INFO, folder, out, overwrite=True, skip_existing=True)


def test_overlapped_reading_and_writing_change_nothing(tmp_path, inputs):
    """overlap_io reads the next case and writes the last ones in threads while the network runs: the same
    outcomes in the same order, reported in order, the same files; a case whose write fails (its output
    path is a folder) is reported failed, naming it, and the cases after it still run."""
    folder, _ = inputs
    files = [folder / "a.nii.gz", folder / "broken.nii.gz", folder / "b.nii.gz", folder / "a.nii.gz"]
    results = {}
    for overlap in (False, True):
        out = tmp_path / f"out{int(overlap)}"
        (out / "a_2_seg.nii.gz").mkdir(parents=True)  # the second "a" cannot be written
        seen = []
        res = predict_files(ThresholdSegmenter(), INFO, files, out, device="cpu", overwrite=True,
                            on_case=seen.append, overlap_io=overlap)
        assert seen == res.cases
        results[overlap] = res
        assert [c.status for c in res.cases] == ["written", "failed", "written", "failed"]
        assert "a_2_seg.nii.gz" in res.cases[3].message
    plain, overlapped = results[False], results[True]
    assert [(c.case_id, c.status) for c in plain.cases] == [(c.case_id, c.status) for c in overlapped.cases]
    for name in ("a_seg.nii.gz", "b_seg.nii.gz"):
        a, b = (nib.load(results[o].out_dir + "/" + name) for o in (False, True))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.array_equal(a.affine, b.affine)


def test_no_input_is_an_error_and_an_empty_folder_a_failed_case(tmp_path):
    with pytest.raises(ValueError, match="no NIfTI files or DICOM series"):
        predict_files(ThresholdSegmenter(), INFO, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    res = predict_files(ThresholdSegmenter(), INFO, tmp_path / "empty", tmp_path / "out")
    assert not res.written and [c.unreadable for c in res.cases] == [True]
    assert str(tmp_path / "empty") in res.failed[0][1]


def test_repeated_case_ids_get_distinct_names(tmp_path, inputs):
    folder, _ = inputs
    found = discover_inputs([folder / "a.nii.gz", folder / "a.nii.gz"])
    assert [c.case_id for c in found] == ["a", "a_2"]


def test_predict_labels_uses_the_checkpoint_window_and_rejects_unknown_options():
    image = torch.rand(1, 20, 18, 17)
    labels = predict_labels(ThresholdSegmenter(), INFO, image, overlap=0.25)
    assert labels.dtype == np.int64 and labels.shape == (20, 18, 17)
    np.testing.assert_array_equal(labels, (image[0] > 0.5).numpy().astype(np.int64))
    assert set(WindowOptions.__annotations__) == {"roi", "overlap", "sw_batch_size", "tta_flips", "device", "amp"}
    with pytest.raises(TypeError, match="tta"):
        predict_labels(ThresholdSegmenter(), INFO, image, tta="all")


def test_read_ahead_reads_that_many_cases_beside_the_network(tmp_path, inputs, monkeypatch):
    """``read_ahead=N`` keeps N cases loading while the network runs one, never more, with the same outcomes
    and files as reading in turn; it refuses what is not a whole number >= 1."""
    from mambamim.inference import segment

    folder, _ = inputs
    files = [folder / "a.nii.gz", folder / "b.nii.gz"] * 3
    real_load = segment.load_case
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def slow_load(info, paths):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.15)  # long enough for the loads in flight to overlap
        try:
            return real_load(info, paths)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(segment, "load_case", slow_load)
    outputs = {}
    for ahead in (1, 2, 3):
        state.update(now=0, most=0)
        out = tmp_path / f"ahead{ahead}"
        res = predict_files(ThresholdSegmenter(), INFO, files, out, device="cpu", read_ahead=ahead)
        assert [c.status for c in res.cases] == ["written"] * 6
        assert state["most"] == ahead  # the loads of N cases overlapped, never N + 1
        outputs[ahead] = {p.name: np.asarray(nib.load(p).dataobj) for p in out.iterdir()}
    assert outputs[1].keys() == outputs[2].keys() == outputs[3].keys()
    for name in outputs[1]:
        assert np.array_equal(outputs[1][name], outputs[2][name]) and np.array_equal(outputs[1][name], outputs[3][name])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="read_ahead"):
            predict_files(ThresholdSegmenter(), INFO, files, tmp_path / "bad", read_ahead=bad)
