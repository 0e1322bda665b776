"""Loaders over the preprocessed cache: crops, centre statistics, sharding, eval volumes, folds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mambamim.data.loaders import (CacheCropSampled, build_eval_dataset, collate_crops, build_train_dataset, build_train_loader,
                                   infinite_batches, list_case_ids, shard_indices, split_cases)


def write_cache(root, cases):
    """cases: list of (id, image (C,X,Y,Z) float32, label (X,Y,Z) uint8 or None). Writes the fixed cache layout."""
    entries = []
    for cid, image, label in cases:
        d = os.path.join(root, "cases", cid)
        os.makedirs(d, exist_ok=True)
        np.save(os.path.join(d, "image.npy"), image.astype(np.float32))
        if label is not None:
            np.save(os.path.join(d, "label.npy"), label.astype(np.uint8))
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"id": cid}, f)
        entries.append({"id": cid, "image": f"cases/{cid}/image.npy",
                        "label": f"cases/{cid}/label.npy" if label is not None else None,
                        "meta": f"cases/{cid}/meta.json", "shape": list(image.shape)})
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"format": "mambamim-cache", "version": 1, "preprocessing": {}, "labels": {"0": "background"},
                   "cases": entries}, f)
    return str(root)


def coded_case(shape, seed=0):
    """Image whose value encodes the voxel position (so crops can be located); label from a cube."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    code = (x * shape[1] * shape[2] + y * shape[2] + z).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    c = [s // 2 for s in shape]
    label[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4, c[2] - 4:c[2] + 4] = 1 + seed % 3
    return code[None] + 1.0, label


@pytest.fixture(scope="module")
def coded_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    cases = []
    for i, shape in enumerate([(40, 36, 34), (36, 40, 38), (19, 40, 44)]):  # the last is shorter than the crop in x (odd padding)
        img, lab = coded_case(shape, i)
        cases.append((f"c{i}", img, lab))
    return write_cache(root, cases), {cid: (img, lab) for cid, img, lab in cases}


def locate(crop, img):
    """(x0, y0, z0) of a crop inside the coded image, checking the crop is an exact sub-block."""
    shape = img.shape[1:]
    vals = crop[0]
    inside = vals > 0
    first = vals[inside].min() - 1.0
    x0, rem = divmod(int(first), shape[1] * shape[2])
    y0, z0 = divmod(rem, shape[2])
    return x0, y0, z0


def test_crops_shape_count_and_content(coded_cache):
    root, data = coded_cache
    loader = build_train_loader(root, crop_size=32, num_crops=3, batch_size=2, augment=False, num_workers=0, seed=1)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [6, 3]  # 3 volumes, 2 per batch, 3 crops each
    for b in batches:
        assert b["image"].dtype == torch.float32 and b["label"].dtype == torch.int64
        assert tuple(b["image"].shape[1:]) == (1, 32, 32, 32) and tuple(b["label"].shape[1:]) == (1, 32, 32, 32)
        assert type(b["image"]) is torch.Tensor
    # every crop is an exact block of its source (with symmetric zero padding where the source is short)
    ds = build_train_dataset(root, crop_size=32, num_crops=3, augment=False)
    ds.transform.set_random_state(0)
    for i, cid in enumerate(list_case_ids(root)):
        img, lab = data[cid]
        for crop in ds[i]:
            c = crop["image"].numpy()
            x0, y0, z0 = locate(c, img)
            padx = (32 - img.shape[1]) // 2 if img.shape[1] < 32 else 0  # MONAI SpatialPad: floor half before
            nx = min(32, img.shape[1])
            src = img[0, x0:x0 + nx, y0:y0 + 32, z0:z0 + 32]
            np.testing.assert_array_equal(c[0, padx:padx + nx], src)
            np.testing.assert_array_equal(crop["label"].numpy()[0, padx:padx + nx], lab[x0:x0 + nx, y0:y0 + 32, z0:z0 + 32])
            if padx:
                assert np.all(c[0, :padx] == 0) and np.all(c[0, padx + nx:] == 0)


def test_pos_neg_centre_ratio_and_image_threshold(tmp_path):
    shape = (64, 64, 64)
    label = np.zeros(shape, np.uint8)
    label[28:38, 26:36, 30:40] = 2
    image = np.full(shape, 0.4, np.float32)
    image[40:] = 0.0  # background centres must avoid image <= image_threshold (0)
    image[label > 0] = 0.8
    root = write_cache(tmp_path, [("a", image[None], label)])
    s = CacheCropSampled(crop_size=16, num_crops=400, labeled=True)
    s.set_random_state(123)
    crops = s({"id": "a", "image": os.path.join(root, "cases/a/image.npy"),
               "label": os.path.join(root, "cases/a/label.npy")})
    assert len(crops) == 400
    centre_lab = np.array([c["label"][0, 8, 8, 8] for c in crops])
    centre_img = np.array([c["image"][0, 8, 8, 8] for c in crops])
    frac = float((centre_lab > 0).mean())
    assert 0.4 < frac < 0.6, frac  # pos:neg 1:1, binomial sd 0.025
    assert np.all(centre_img > 0), "a background centre fell where image <= image_threshold"
    # pos=3, neg=1 shifts the ratio to 3/4
    s3 = CacheCropSampled(crop_size=16, num_crops=400, labeled=True, pos=3, neg=1)
    s3.set_random_state(7)
    crops = s3({"id": "a", "image": os.path.join(root, "cases/a/image.npy"),
                "label": os.path.join(root, "cases/a/label.npy")})
    frac3 = float(np.mean([c["label"][0, 8, 8, 8] > 0 for c in crops]))
    assert 0.65 < frac3 < 0.85, frac3


def test_unlabeled_foreground_bias(tmp_path):
    shape = (48, 48, 48)
    image = np.zeros(shape, np.float32)
    image[10:22, 12:24, 20:30] = 0.5  # 1440 of 110592 voxels above the threshold
    root = write_cache(tmp_path, [("u", image[None], None)])
    s = CacheCropSampled(crop_size=8, num_crops=400, labeled=False, fg_fraction=0.75)
    s.set_random_state(5)
    crops = s({"id": "u", "image": os.path.join(root, "cases/u/image.npy"), "label": None})
    assert all(set(c) == {"image"} for c in crops)
    frac = float(np.mean([c["image"][0, 4, 4, 4] > 0.05 for c in crops]))
    assert 0.65 < frac < 0.86, frac  # 0.75 + 0.25 * 0.013


def test_unlabeled_loader_and_label_mode_checks(tmp_path):
    img, lab = coded_case((24, 24, 24))
    root = write_cache(tmp_path, [("l", img, lab), ("u", img, None)])
    with pytest.raises(ValueError, match="labeled=False"):
        build_train_loader(root, num_workers=0)
    with pytest.raises(ValueError, match="no label"):
        build_train_loader(root, labeled=True, num_workers=0)
    with pytest.raises(ValueError, match="unknown case"):
        build_train_loader(root, ["nope"], num_workers=0)
    loader = build_train_loader(root, crop_size=16, num_crops=2, batch_size=2, labeled=False, num_workers=0)
    b = next(iter(loader))
    assert set(b) == {"image"} and tuple(b["image"].shape) == (4, 1, 16, 16, 16)
    assert next(iter(build_train_loader(root, ["l"], crop_size=16, num_workers=0)))["label"].shape[0] == 4


def test_swin_augmentations_keep_image_and_label_aligned(tmp_path):
    rng = np.random.default_rng(0)
    lab = (rng.random((24, 24, 24)) < 0.3).astype(np.uint8)
    lab[8:16, 8:16, 8:16] = 1
    image = (0.5 + 0.4 * (lab > 0)).astype(np.float32)[None]
    root = write_cache(tmp_path, [("a", image, lab)])
    ds = build_train_dataset(root, crop_size=(16, 16, 16), num_crops=50, augment=True)
    ds.transform.set_random_state(3)
    n_changed = 0
    ref = None
    for _ in range(4):
        for crop in ds[0]:
            im, lb = crop["image"].numpy()[0], crop["label"].numpy()[0]
            np.testing.assert_array_equal(im > 0.68, lb > 0)  # scale 0.9-1.1 and shift +-0.1 keep the classes apart
            vals = np.unique(np.round(im, 4))
            n_changed += int(not set(vals.tolist()) <= {0.5, 0.9})
            ref = crop
    assert n_changed > 0, "intensity augmentation never applied"
    assert ref["image"].dtype == torch.float32 and ref["label"].dtype == torch.int64


def test_reproducible_under_seed(coded_cache):
    root, _ = coded_cache

    def first(seed, workers=0):
        loader = build_train_loader(root, crop_size=16, num_crops=2, batch_size=1, num_workers=workers, seed=seed)
        it = infinite_batches(loader)
        return [next(it)["image"] for _ in range(4)]  # crosses an epoch boundary (3 volumes)

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    w1, w2 = first(0, workers=2), first(0, workers=2)
    assert all(torch.equal(x, y) for x, y in zip(w1, w2))


def test_ddp_shards_disjoint_and_covering(tmp_path):
    img, lab = coded_case((8, 8, 8))
    root = write_cache(tmp_path, [(f"c{i}", img, lab) for i in range(7)])
    for world in (2, 3):
        shards = [list(build_train_loader(root, crop_size=8, num_crops=1, num_workers=0, seed=4,
                                          distributed=(r, world)).sampler) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # equal steps on every rank
        flat = [i for s in shards for i in s]
        assert set(flat) == set(range(7))
        assert len(flat) - len(set(flat)) == (-7) % world  # only the padding repeats
    even = [list(build_train_loader(root, ["c0", "c1", "c2", "c3", "c4", "c5"], crop_size=8, num_workers=0,
                                    distributed=(r, 3)).sampler) for r in range(3)]
    flat = [i for s in even for i in s]
    assert sorted(flat) == list(range(6))
    # set_epoch reshuffles, deterministically
    sampler = build_train_loader(root, crop_size=8, num_workers=0, distributed=(0, 1)).sampler
    e0 = list(sampler)
    sampler.set_epoch(1)
    e1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == e0 and e1 != e0 and sorted(e1) == list(range(7))
    parts = [shard_indices(7, (r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))
    with pytest.raises(ValueError):
        shard_indices(7, (3, 3))


def test_eval_dataset_whole_volumes(coded_cache, tmp_path):
    root, data = coded_cache
    ds = build_eval_dataset(root, ["c2", "c0"])
    assert len(ds) == 2
    item = ds[0]
    assert item["case_id"] == "c2" and item["meta_path"].endswith("cases/c2/meta.json")
    img, lab = data["c2"]
    assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == img.shape
    np.testing.assert_array_equal(item["image"].numpy(), img)
    assert item["label"].dtype == torch.int64 and tuple(item["label"].shape) == (1,) + lab.shape
    np.testing.assert_array_equal(item["label"].numpy()[0], lab)
    root2 = write_cache(tmp_path, [("u", img, None)])
    assert "label" not in build_eval_dataset(root2)[0]


def test_split_cases_five_fold():
    ids = [f"case{i:02d}" for i in range(23)]
    vals = []
    for fold in range(5):
        train, val = split_cases(ids, fold)
        assert set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
        assert len(val) in (4, 5)
        assert (train, val) == split_cases(list(reversed(ids)), fold)  # order-invariant, deterministic
        vals += val
    assert sorted(vals) == ids  # the folds partition the set
    assert split_cases(ids, 0, seed=1) != split_cases(ids, 0, seed=0)
    assert split_cases(ids, None) == (sorted(ids), [])
    for bad in (dict(fold=5), dict(fold=-1), dict(fold=0, num_folds=1)):
        with pytest.raises(ValueError):
            split_cases(ids, **bad)
    with pytest.raises(ValueError):
        split_cases(ids[:3], 0)


def test_picks_up_initialised_process_group(tmp_path):
    import torch.distributed as dist

    img, lab = coded_case((8, 8, 8))
    root = write_cache(tmp_path / "c", [(f"c{i}", img, lab) for i in range(3)])
    with pytest.raises(ValueError, match="not initialised"):
        build_train_loader(root, crop_size=8, num_workers=0, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        sampler = build_train_loader(root, crop_size=8, num_workers=0).sampler
        assert sampler.num_replicas == 1 and sampler.rank == 0 and sorted(sampler) == [0, 1, 2]
        assert shard_indices(3) == [0, 1, 2]
    finally:
        dist.destroy_process_group()


def test_collate_crops_flattens_volumes():
    vols = [[{"image": torch.full((1, 2, 2, 2), float(v * 10 + c)), "label": torch.full((1, 2, 2, 2), v, dtype=torch.int64),
              "case_id": f"v{v}"} for c in range(3)] for v in range(2)]
    b = collate_crops(vols)
    assert tuple(b["image"].shape) == (6, 1, 2, 2, 2) and b["label"].dtype == torch.int64
    assert b["image"][:, 0, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    assert b["label"][:, 0, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert b["case_id"] == ["v0"] * 3 + ["v1"] * 3


def test_data_package_import_is_light():
    import subprocess
    import sys

    import mambamim.data as d

    code = ("import sys, mambamim.data; heavy = [m for m in ('torch', 'monai', 'scipy', 'nibabel') if m in sys.modules];"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert d.split_cases is split_cases and d.build_train_loader is build_train_loader  # lazy names resolve


def test_items_are_a_function_of_seed_epoch_index(coded_cache):
    """Crops and augmentation of an item depend on (seed, epoch, index, repeat) only: not on the worker
    that loads it nor on what was loaded before (issue 18.2: exact resume with workers)."""
    from mambamim.data.loaders import ItemKey, item_seed

    root, _ = coded_cache
    ds = build_train_dataset(root, crop_size=16, num_crops=2, augment=True, seed=5)
    first = ds[ItemKey(1, epoch=2)]
    ds[0], ds[ItemKey(2, epoch=7)]  # other draws in between change nothing
    again = ds[ItemKey(1, epoch=2)]
    assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
               for a, b in zip(first, again))
    differ = [ds[ItemKey(1, epoch=3)], ds[ItemKey(1, epoch=2, repeat=1)],
              build_train_dataset(root, crop_size=16, num_crops=2, augment=True, seed=6)[ItemKey(1, epoch=2)]]
    for other in differ:
        assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
    ds.set_epoch(2)  # a plain int takes the dataset's epoch
    assert np.array_equal(ds[1][0]["image"], first[0]["image"])
    assert item_seed(5, 2, 1) == item_seed(5, 2, 1) != item_seed(5, 2, 1, 1)
    key = ItemKey(4, epoch=3, repeat=1)
    import pickle

    back = pickle.loads(pickle.dumps(key))
    assert back == 4 and (back.epoch, back.repeat) == (3, 1) and hash(back) == hash(4)


def test_loader_same_batches_with_any_workers_and_mid_epoch_start(coded_cache):
    root, _ = coded_cache

    def epochs(workers, start=None):
        loader = build_train_loader(root, crop_size=16, num_crops=2, batch_size=2, num_workers=workers, seed=2)
        out = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            if start is not None and epoch == 1:
                loader.sampler.skip_next(start * loader.batch_size)
            out.append([b["image"] for b in loader])
        return out

    ref = epochs(0)
    assert [len(e) for e in ref] == [2, 2] and not torch.equal(ref[0][0], ref[1][0])
    for workers in (1, 2):
        got = epochs(workers)
        assert all(torch.equal(a, b) for ea, eb in zip(ref, got) for a, b in zip(ea, eb))
    resumed = epochs(2, start=1)  # epoch 1 from its second batch: exactly the uninterrupted one's
    assert len(resumed[1]) == 1 and torch.equal(resumed[1][0], ref[1][1])


def test_epoch_sampler_matches_distributed_sampler_and_skips_once(tmp_path):
    from torch.utils.data.distributed import DistributedSampler

    from mambamim.data.loaders import EpochSampler

    data = list(range(7))
    for world in (1, 2, 3):
        for rank in range(world):
            ours, theirs = EpochSampler(data, world, rank, seed=4), DistributedSampler(data, world, rank, seed=4)
            for epoch in (0, 3):
                ours.set_epoch(epoch)
                theirs.set_epoch(epoch)
                keys = list(ours)
                assert keys == list(theirs) and len(ours) == len(theirs)
                assert all(k.epoch == epoch for k in keys)
                assert sum(k.repeat for k in keys) == sum(1 for p in range(rank, ours.total_size, world) if p >= 7)
    s = EpochSampler(data, seed=1)
    full = list(s)
    s.skip_next(3)
    assert list(s) == full[3:] and len(s) == 7
    assert list(s) == full  # the skip applies to one pass only
    with pytest.raises(ValueError):
        s.skip_next(-1)


def test_class_balanced_centres_visit_small_classes_as_often_as_large(tmp_path):
    from mambamim.data.loaders import CacheCropSampled

    img = np.full((1, 40, 40, 40), 0.5, np.float32)
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[:30, :30, :30] = 1  # 27,000 voxels
    lab[35:37, 35:37, 35:37] = 2  # 8 voxels
    np.save(tmp_path / "i.npy", img)
    np.save(tmp_path / "l.npy", lab)
    case = {"id": "c", "image": str(tmp_path / "i.npy"), "label": str(tmp_path / "l.npy")}

    def small_share(balanced: bool) -> float:
        s = CacheCropSampled(crop_size=2, num_crops=2000, labeled=True, pos=1, neg=0, class_balanced=balanced)
        s.R.seed(0)
        crops = s(case)
        return float(np.mean([c["label"][0, 1, 1, 1] == 2 for c in crops]))

    assert 0.4 < small_share(True) < 0.6  # half the foreground centres land in the 8-voxel class
    assert small_share(False) < 0.01  # by volume: 8 in 27,008
