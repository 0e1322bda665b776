"""Labels land on exactly the grid of their image (issue 16, item 4).

A sphere of radius 25 mm is written twice: as a CT (partial-volume edges, like a scanner) and as a label map
(voxel centres inside). After preprocessing, the image's sphere (intensity-weighted centroid), the label's
sphere and the true centre mapped through ``meta["cache"]["affine"]`` must agree within 0.1 target voxel on
every axis. Before the fix the label sat half a target voxel (-0.75 mm) off on each axis upsampled by 2.
The rest of the error is sampling noise of a digitised sphere (<= 0.06 voxel over random sub-voxel centres).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mambamim.data.cache import load_case
from mambamim.data.prepare import prepare_dataset
from mambamim.data.preprocess import (PreprocessParams, _resample, preprocess_image, preprocess_label,
                                      restore_to_original)

TARGET = 1.5  # mm, the default cache spacing
TOL = 0.1  # target voxels
TOL_MM = TOL * TARGET  # the same, in world mm, for checks on the original grid
RADIUS, CENTRE = 25.0, np.array([2.0, -3.0, 5.0])
BODY_HU, SPHERE_HU = 40.0, 200.0


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


# voxel -> world 3x3 parts: 0.8 mm and 1.1 mm downsample to 1.5 mm, 3.0 mm upsamples by 2;
# "ties075" adds the cases where half the samples fall halfway (1.0 mm forward, 0.75 mm on the way back)
GRIDS = {
    "RAS": np.diag([0.8, 1.1, 3.0]),
    "LPS": np.diag([-0.8, -1.1, 3.0]),
    "oblique": _rotation(20) @ np.diag([0.8, 1.1, 3.0]),
    "ties075": np.diag([0.75, 1.0, 3.0]),
}


def _distance(affine: np.ndarray, shape, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Distance (mm) from CENTRE of each voxel centre (+ ``offset`` in voxels)."""
    grid = np.indices(shape).astype(np.float64) + np.asarray(offset)[:, None, None, None]
    world = np.einsum("ij,j...->i...", affine[:3, :3], grid) + affine[:3, 3, None, None, None]
    return np.sqrt(((world - CENTRE[:, None, None, None]) ** 2).sum(0))


def _sphere_case(tmp_path, lin: np.ndarray, sub=(0.3, -0.2, 0.35)) -> tuple[str, str, np.ndarray, np.ndarray]:
    """Write image (HU) and label NIfTIs of the sphere; returns (image path, label path, label, affine)."""
    spacing = np.sqrt((lin ** 2).sum(0))
    shape = tuple(int(2 * (RADIUS + 8) / s) for s in spacing)
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = CENTRE - lin @ ((np.array(shape) - 1) / 2 + np.asarray(sub))  # centre off the voxel grid
    dist = _distance(a, shape)
    offs = np.array([-1, 0, 1]) / 3.0  # 27 sub-samples per voxel: partial-volume edges
    frac = np.mean([_distance(a, shape, (i, j, k)) < RADIUS for i in offs for j in offs for k in offs], axis=0)
    img = np.where(dist < RADIUS + 6, BODY_HU, -1000.0) + (SPHERE_HU - BODY_HU) * frac  # sphere inside a body
    lab = (dist < RADIUS).astype(np.uint8)
    paths = []
    for folder, arr in (("images", img.astype(np.float32)), ("labels", lab)):  # the images/ + labels/ layout
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        paths.append(str(tmp_path / folder / "ball.nii.gz"))
        nib.save(nib.Nifti1Image(arr, a), paths[-1])
    return paths[0], paths[1], lab, a


def _weighted_centroid(w: np.ndarray) -> np.ndarray:
    return (np.indices(w.shape).reshape(3, -1) * w.ravel()).sum(1) / w.sum()


def _world(affine, idx) -> np.ndarray:
    return (np.asarray(affine) @ np.append(idx, 1.0))[:3]


def _check_cache_case(image: np.ndarray, label: np.ndarray, meta: dict) -> None:
    params = PreprocessParams.from_dict(meta["preprocessing"])
    body = (BODY_HU - params.hu_min) / (params.hu_max - params.hu_min)
    c_img = _weighted_centroid(np.clip(image[0] - body, 0, None))  # the sphere's contrast over the body
    c_lab = np.argwhere(label == 1).mean(0)
    cache_affine = np.asarray(meta["cache"]["affine"])
    true = np.linalg.solve(cache_affine, np.append(CENTRE, 1.0))[:3]
    np.testing.assert_allclose(c_img, true, atol=TOL, err_msg="image sphere off its true centre")
    np.testing.assert_allclose(c_lab, true, atol=TOL, err_msg="label sphere off its true centre")
    np.testing.assert_allclose(c_lab, c_img, atol=TOL, err_msg="label sphere off the image sphere")


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_label_and_image_sphere_share_the_cache_grid(tmp_path, grid):
    ip, lp, _, _ = _sphere_case(tmp_path, GRIDS[grid])
    image, meta = preprocess_image(ip, PreprocessParams(min_size=0))
    scale = np.asarray(meta["resampled"]["scale"])
    assert (scale > 1).any() and (scale < 1).any()  # both down- and upsampled axes
    _check_cache_case(image, preprocess_label(lp, meta), meta)


def test_prepare_dataset_caches_label_on_image_grid(tmp_path):
    _sphere_case(tmp_path / "src", GRIDS["oblique"])
    rep = prepare_dataset(tmp_path / "src", tmp_path / "cache", params=PreprocessParams(min_size=0),
                          progress=False)
    assert rep.prepared == ["ball"]
    case = load_case(tmp_path / "cache", "ball")
    _check_cache_case(np.asarray(case["image"]), np.asarray(case["label"]), case["meta"])


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_restore_puts_cache_label_back_on_original_grid(tmp_path, grid):
    """What ``predict`` does: a label on the cache grid goes back to the original grid.

    Tolerance: 0.1 target voxel (0.15 mm) in world mm, per world axis, for (a) a perfect prediction (the
    sphere drawn on the cache grid) against the true centre and (b) the cached label against the source.
    """
    ip, lp, lab, a = _sphere_case(tmp_path, GRIDS[grid])
    _, meta = preprocess_image(ip, PreprocessParams(min_size=0))
    cache_affine = np.asarray(meta["cache"]["affine"])
    predicted = (_distance(cache_affine, meta["cache"]["shape"][1:]) < RADIUS).astype(np.uint8)
    back, back_affine = restore_to_original(predicted, meta)
    np.testing.assert_allclose(back_affine, a)
    # X-fastest, as NIfTI stores it (these grids keep the axis order; a flip only negates a stride), so the
    # writer copies it without a transpose
    assert abs(back.strides[0]) == back.itemsize
    np.testing.assert_allclose(_world(a, np.argwhere(back == 1).mean(0)), CENTRE, atol=TOL_MM)
    back, _ = restore_to_original(preprocess_label(lp, meta), meta)
    np.testing.assert_allclose(_world(a, np.argwhere(back == 1).mean(0)),
                               _world(a, np.argwhere(lab == 1).mean(0)), atol=TOL_MM)


def test_nearest_ties_split_evenly_like_trilinear():
    """Upsampling by 2 puts every other sample halfway: the label keeps the image's centroid and volume."""
    lab = np.zeros((10, 8, 6), np.uint8)
    lab[2:7, 1:5, 2:4] = 1
    lab[7:9, 1:5, 1:5] = 2  # a neighbour class sharing a face
    up = np.diag([0.5, 0.5, 0.5, 1.0])
    shape = [2 * n for n in lab.shape]
    near = _resample(lab, up, shape, order=0)
    for k in (1, 2):
        img = _resample((lab == k).astype(np.float32), up, shape, order=1)
        np.testing.assert_allclose(np.argwhere(near == k).mean(0), _weighted_centroid(img), atol=1e-9)
        assert (near == k).sum() == pytest.approx(img.sum())
        assert (near == k).sum() == 8 * (lab == k).sum()
    assert np.array_equal(near[::2, ::2, ::2], lab)  # samples on input centres copy them


def test_real_ct_organs_keep_their_world_position(tmp_path, real_ct):
    """Kidney centroids (world mm) before and after the default 3 mm -> 1.5 mm preprocessing.

    Before the fix both moved by (-0.75, -0.75, -0.75) mm; now by < 0.01 mm. Organs cut by the field of view
    (liver, spleen, aorta reach the last slice) are left out: the last cache slice is centred on the edge of
    the original field of view and copies the edge slice, in the image as in the label, so their centroids
    move (up to 0.5 mm) without any misregistration.
    """
    _, meta = preprocess_image(str(real_ct / "image.nii.gz"), PreprocessParams(min_size=0))
    label = preprocess_label(str(real_ct / "label.nii.gz"), meta)
    src = nib.load(str(real_ct / "label.nii.gz"))
    orig = np.asarray(src.dataobj)
    for k in (2, 3):  # kidney_right, kidney_left
        before = _world(src.affine, np.argwhere(orig == k).mean(0))
        after = _world(meta["cache"]["affine"], np.argwhere(label == k).mean(0))
        np.testing.assert_allclose(after, before, atol=TOL_MM, err_msg=f"class {k}")
    assert np.array_equal(restore_to_original(label, meta)[0], orig)
