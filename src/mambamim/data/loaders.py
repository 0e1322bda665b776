"""Training and validation loaders over the preprocessed cache (``mambamim data prepare``).

Cache layout (fixed)::

    CACHE/dataset.json           {"format": "mambamim-cache", "version": 1, "labels": {...} | null,
                                  "cases": [{"id", "image", "label" | null, "meta", "shape": [C, X, Y, Z]}]}
    CACHE/cases/<id>/image.npy   float32 (C, X, Y, Z), intensities in [0, 1], RAS, 1.5 mm
    CACHE/cases/<id>/label.npy   uint8 (X, Y, Z)

Training crops are read straight from memory-mapped ``.npy`` files: only the crop windows are
copied, and crop centres come from per-case foreground / background voxel indices that are
computed once per worker (a random subset of at most ``max_indices`` per class, so memory stays
small) and kept in a small LRU. Centre sampling follows MONAI ``RandCropByPosNegLabeld``
(pos:neg ratio, background restricted to ``image > image_threshold``, centres moved inside the
volume, volumes smaller than the crop padded symmetrically with zeros); augmentations are MONAI
transforms.

Reproducibility: the training order is a function of (seed, epoch) and every item's crops and
augmentation a function of (seed, epoch, index), not of worker processes or of what was loaded
before, so a run resumed mid-epoch (``EpochSampler.skip_next``) sees exactly the batches an
uninterrupted run sees, with any number of workers.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import OrderedDict
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data.distributed import DistributedSampler

from mambamim.data.cache import check_cached_array, read_cache_index  # read_cache_index: re-exported, the one reader

logger = logging.getLogger(__name__)


def _select_cases(cache_dir: str | os.PathLike, case_ids: Sequence[str] | None) -> list[dict]:
    """Case records (paths made absolute) for ``case_ids`` (all cases when None), in the given order."""
    root = os.fspath(cache_dir)
    index = read_cache_index(root)
    by_id = {str(c["id"]): c for c in index["cases"]}
    ids = list(by_id) if case_ids is None else [str(i) for i in case_ids]
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{root}: unknown case ids {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if not ids:
        raise ValueError("case_ids is empty")
    out = []
    for i in ids:
        c = by_id[i]
        out.append({
            "id": i,
            "image": os.path.join(root, c["image"]),
            "label": os.path.join(root, c["label"]) if c.get("label") else None,
            "meta": os.path.join(root, c["meta"]) if c.get("meta") else None,
        })
        for key in ("image", "label"):  # a missing / truncated .npy is named here, not in a worker
            if out[-1][key]:
                check_cached_array(out[-1][key], i)
    return out


def list_case_ids(cache_dir: str | os.PathLike, labeled_only: bool = False) -> list[str]:
    """Case ids of a cache in index order (only those with a label when ``labeled_only``)."""
    return [str(c["id"]) for c in read_cache_index(cache_dir)["cases"] if c.get("label") or not labeled_only]


def split_cases(case_ids: Sequence[str], fold: int | None, num_folds: int = 5, seed: int = 0
                ) -> tuple[list[str], list[str]]:
    """Deterministic k-fold split: ``(train_ids, val_ids)``, both sorted.

    The ids are sorted, shuffled with ``seed`` and cut into ``num_folds`` near-equal folds; fold
    ``fold`` is the validation set. ``fold=None`` puts every case in training (no validation).
    The result does not depend on the order of ``case_ids``.
    """
    ids = sorted(str(i) for i in case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case_ids contains duplicates")
    if fold is None:
        return ids, []
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    if len(ids) < num_folds:
        raise ValueError(f"{len(ids)} cases cannot be split into {num_folds} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    val_idx = set(np.array_split(order, num_folds)[fold].tolist())
    train = [ids[i] for i in range(len(ids)) if i not in val_idx]
    val = [ids[i] for i in range(len(ids)) if i in val_idx]
    return train, val


# ---------------------------------------------------------------------------------------------
# crop sampling
# ---------------------------------------------------------------------------------------------
def _as_crop_size(crop_size: int | Sequence[int]) -> tuple[int, int, int]:
    size = (crop_size,) * 3 if isinstance(crop_size, int) else tuple(int(s) for s in crop_size)
    if len(size) != 3 or any(s < 1 for s in size):
        raise ValueError(f"crop_size must be a positive int or 3 positive ints, got {crop_size}")
    return size  # type: ignore[return-value]


def _window(center: int, dim: int, size: int) -> tuple[slice, tuple[int, int]]:
    """Source slice along one axis and (before, after) zero padding for a crop centred at ``center``."""
    if dim >= size:
        start = min(max(center - size // 2, 0), dim - size)
        return slice(start, start + size), (0, 0)
    pad = size - dim
    return slice(0, dim), (pad // 2, pad - pad // 2)


class CacheCropSampled(Randomizable):
    """Turn one case record into ``num_crops`` crop dicts read from the memory-mapped cache.

    Input: ``{"id", "image": path, "label": path | None}``. Output: a list of ``num_crops`` dicts
    ``{"image": float32 (C, *crop_size)[, "label": uint8 (1, *crop_size)]}`` (numpy).

    Labeled (``labeled=True``): centre on a foreground voxel (label > 0) with probability
    ``pos / (pos + neg)``, else on a background voxel; both restricted to voxels where some channel
    is ``> image_threshold`` (as MONAI ``RandCropByPosNegLabeld`` with ``image_key``). With
    ``class_balanced`` (the default) a foreground centre first draws one of the case's classes
    uniformly, then a voxel of that class (nnU-Net's foreground oversampling, MONAI
    ``RandCropByLabelClassesd``), so a small organ is a crop centre as often as the liver. Unlabeled:
    with probability ``fg_fraction`` on a voxel where some channel is ``> fg_threshold``, else
    uniform over the volume. Centres are moved so the
    crop lies inside the volume; axes shorter than the crop are zero-padded symmetrically.

    Random draws use ``self.R`` (a ``numpy.random.RandomState``); :class:`CropDataset` seeds it
    (through ``Compose.set_random_state``) for every item.
    """

    def __init__(self, crop_size: int | Sequence[int] = 96, num_crops: int = 4, labeled: bool = True,
                 pos: float = 1.0, neg: float = 1.0, image_threshold: float = 0.0, fg_threshold: float = 0.05,
                 fg_fraction: float = 0.75, max_indices: int = 50_000, cache_cases: int = 64,
                 class_balanced: bool = True) -> None:
        self.crop_size = _as_crop_size(crop_size)
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"pos and neg must be >= 0 with a positive sum, got pos={pos}, neg={neg}")
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        if max_indices < 1 or cache_cases < 1:
            raise ValueError("max_indices and cache_cases must be >= 1")
        self.num_crops = int(num_crops)
        self.labeled = bool(labeled)
        self.pos_ratio = pos / (pos + neg)
        self.image_threshold = float(image_threshold)
        self.fg_threshold = float(fg_threshold)
        self.fg_fraction = float(fg_fraction)
        self.max_indices = int(max_indices)
        self.cache_cases = int(cache_cases)
        self.class_balanced = bool(class_balanced)
        self._indices: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._classes: dict[str, list[np.ndarray]] = {}  # per case: foreground indices grouped by class
        self.R = np.random.RandomState()

    def randomize(self, data: Any = None) -> None:  # draws happen in __call__ through self.R
        pass

    def _subsample(self, idx: np.ndarray, case_id: str, salt: int) -> np.ndarray:
        if len(idx) > self.max_indices:
            rng = np.random.default_rng([zlib.crc32(case_id.encode()), salt])
            idx = np.sort(rng.choice(idx, self.max_indices, replace=False))
        return idx.astype(np.int32 if idx.size == 0 or idx.max() < 2**31 else np.int64)

    def case_indices(self, case: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(foreground, background) flat voxel indices of a case (cached, subsampled)."""
        key = self._key(case)
        hit = self._indices.get(key)
        if hit is not None:
            self._indices.move_to_end(key)
            return hit
        image = np.load(case["image"], mmap_mode="r")
        if self.labeled:
            lab = np.load(case["label"], mmap_mode="r")
            if lab.shape != image.shape[1:]:
                raise ValueError(f"{case['label']}: label shape {lab.shape} != image shape {image.shape[1:]}")
            raw = np.asarray(lab)
            lab = raw > 0
            valid = np.any(np.asarray(image) > self.image_threshold, axis=0)  # as MONAI map_binary_to_indices
            fg = np.flatnonzero(lab & valid)
            bg = np.flatnonzero(~lab & valid)
            if fg.size == 0:
                fg = np.flatnonzero(lab)
            if bg.size == 0:
                bg = np.flatnonzero(~lab)
            if fg.size == 0:
                logger.warning("case %s has no foreground voxels: all its crops are background-centred", case["id"])
        else:
            fg = np.flatnonzero(np.any(np.asarray(image) > self.fg_threshold, axis=0))
            bg = np.empty(0, np.int64)  # unlabeled: "background" draws are uniform, no list needed
        hit = (self._subsample(fg, str(case["id"]), 0), self._subsample(bg, str(case["id"]), 1))
        self._indices[key] = hit
        if self.labeled and self.class_balanced:
            self._classes[key] = _group_by_class(raw.reshape(-1), hit[0])
        if len(self._indices) > self.cache_cases:
            old_key, _ = self._indices.popitem(last=False)
            self._classes.pop(old_key, None)
        return hit

    def _key(self, case: Mapping[str, Any]) -> str:
        return f"{case['image']}|{self.labeled}"

    def _foreground_pool(self, key: str, fg: np.ndarray) -> np.ndarray:
        """Where a foreground centre is drawn: one class's voxels (class-balanced) or all of them."""
        groups = self._classes.get(key)
        if not groups:
            return fg
        return groups[self.R.randint(len(groups))]

    def _centers(self, fg: np.ndarray, bg: np.ndarray, shape: tuple[int, ...], key: str = ""
                 ) -> list[tuple[int, ...]]:
        centers = []
        for _ in range(self.num_crops):
            u = self.R.rand()
            if self.labeled:
                use_fg = (u < self.pos_ratio and fg.size > 0) or bg.size == 0
                pool = self._foreground_pool(key, fg) if use_fg else bg
                flat = int(pool[self.R.randint(pool.size)]) if pool.size else int(self.R.randint(np.prod(shape)))
            elif u < self.fg_fraction and fg.size > 0:
                flat = int(fg[self.R.randint(fg.size)])
            else:
                flat = int(self.R.randint(int(np.prod(shape))))
            centers.append(tuple(int(v) for v in np.unravel_index(flat, shape)))
        return centers

    def __call__(self, case: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
        if self.labeled and not case.get("label"):
            raise ValueError(f"case {case.get('id')} has no label but the sampler is labeled")
        image = np.load(case["image"], mmap_mode="r")
        if image.ndim != 4:
            raise ValueError(f"{case['image']}: expected (C, X, Y, Z), got shape {image.shape}")
        spatial = tuple(image.shape[1:])
        fg, bg = self.case_indices(case)
        label = np.load(case["label"], mmap_mode="r") if self.labeled else None
        out = []
        for center in self._centers(fg, bg, spatial, self._key(case)):
            wins = [_window(c, d, s) for c, d, s in zip(center, spatial, self.crop_size)]
            sl = tuple(w[0] for w in wins)
            pads = [w[1] for w in wins]
            img = np.array(image[(slice(None),) + sl], dtype=np.float32)
            item = {"image": np.pad(img, [(0, 0)] + pads) if any(p != (0, 0) for p in pads) else img}
            if label is not None:
                lab = np.array(label[sl], dtype=np.uint8)[None]
                item["label"] = np.pad(lab, [(0, 0)] + pads) if any(p != (0, 0) for p in pads) else lab
            out.append(item)
        return out


def _group_by_class(label_flat: np.ndarray, fg: np.ndarray) -> list[np.ndarray]:
    """The foreground indices ``fg`` split by their label value, one array per class present."""
    values = np.asarray(label_flat[fg])
    order = np.argsort(values, kind="stable")
    _, starts = np.unique(values[order], return_index=True)
    return [fg[order[a:b]] for a, b in zip(starts, list(starts[1:]) + [len(order)])]


class _ToTensors:
    """Final step: plain torch tensors, image float32, label int64 (MetaTensor metadata dropped)."""

    def __call__(self, data: dict) -> dict:
        out = {}
        for k, v in data.items():
            t = torch.as_tensor(v)
            if hasattr(t, "as_tensor"):
                t = t.as_tensor()
            dtype = np.int64 if k == "label" else np.float32
            # numpy's cast is several times faster than Tensor.to for uint8 -> int64 on CPU
            out[k] = torch.from_numpy(np.ascontiguousarray(t.numpy(), dtype=dtype))
        return out


def _shared_empty(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Uninitialised CPU tensor in shared memory (as torch's default_collate allocates in workers)."""
    numel = int(np.prod(shape))
    try:
        storage = like._typed_storage()._new_shared(numel, device="cpu")
        return like.new(storage).resize_(shape)
    except (AttributeError, RuntimeError, TypeError):  # private API moved: fall back to a copy into shm
        return torch.empty(shape, dtype=like.dtype).share_memory_()


def collate_crops(batch: Sequence[Any]) -> dict[str, Any]:
    """Collate volumes' crop lists into one batch: tensors stacked along a new dim 0, other values listed.

    ``batch``: list (volumes) of lists (crops) of dicts, or a flat list of dicts. Stacking goes through
    numpy (several times faster than ``torch.stack`` for large CPU tensors on a busy machine) and,
    inside a DataLoader worker, straight into shared memory so the batch is not copied again.
    """
    items = [c for vol in batch for c in (vol if isinstance(vol, (list, tuple)) else [vol])]
    if not items:
        raise ValueError("empty batch")
    in_worker = torch.utils.data.get_worker_info() is not None
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            arrs = [v.numpy() for v in vals]
            shape = (len(arrs),) + arrs[0].shape
            res = _shared_empty(vals[0], shape) if in_worker else torch.empty(shape, dtype=vals[0].dtype)
            np.stack(arrs, out=res.numpy())
            out[key] = res
        else:
            out[key] = vals
    return out


def train_transforms(crop_size: int | Sequence[int] = 96, num_crops: int = 4, labeled: bool = True,
                     augment: bool = True, **sampler_kwargs: Any):
    """MONAI ``Compose``: cache crop sampling, then augmentations, then tensors.

    Labeled + ``augment``: the Swin UNETR set (RandFlipd on each axis p=0.1, RandRotate90d p=0.1
    max_k=3 in the x-y plane, RandScaleIntensityd factors 0.1 p=0.1, RandShiftIntensityd offsets
    0.1 p=0.1). Unlabeled + ``augment``: flips only (p=0.1 per axis), as in pre-training.
    """
    from monai.transforms import (Compose, RandFlipd, RandRotate90d, RandScaleIntensityd,
                                  RandShiftIntensityd)

    size = _as_crop_size(crop_size)
    keys = ["image", "label"] if labeled else ["image"]
    steps: list = [CacheCropSampled(size, num_crops, labeled, **sampler_kwargs)]
    if augment:
        steps += [RandFlipd(keys=keys, prob=0.1, spatial_axis=a) for a in range(3)]
        if labeled:
            if size[0] == size[1]:
                steps.append(RandRotate90d(keys=keys, prob=0.1, max_k=3))
            else:
                logger.info("crop %s is not square in x-y: RandRotate90d left out", size)
            steps += [RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
                      RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1)]
    steps.append(_ToTensors())
    return Compose(steps)


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
class ItemKey(int):
    """A dataset index that also names its ``epoch`` and ``repeat`` (0, or how many times the index
    already came up in the epoch's padded order): what :class:`EpochSampler` yields. It compares
    and hashes as the plain index; it reaches worker processes with the index, so persistent workers
    need no epoch bookkeeping of their own."""

    epoch: int
    repeat: int

    def __new__(cls, index: int, epoch: int = 0, repeat: int = 0) -> "ItemKey":
        key = super().__new__(cls, index)
        key.epoch, key.repeat = int(epoch), int(repeat)
        return key

    def __reduce__(self) -> tuple:
        return ItemKey, (int(self), self.epoch, self.repeat)

    def __repr__(self) -> str:
        return f"ItemKey({int(self)}, epoch={self.epoch}, repeat={self.repeat})"


def item_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """The 32-bit seed of one training item's random draws (crop centres, augmentation), from
    (seed, epoch, index, repeat) through NumPy's ``SeedSequence`` (well mixed, any ints >= 0)."""
    words = [int(v) % 2**64 for v in (seed, epoch, index, repeat)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class CropDataset(TorchDataset):
    """Training items of cache cases: item ``i`` is ``transform(cases[i])`` (a list of crop dicts)
    with every random draw of the transform seeded from (``seed``, epoch, ``i``, repeat).

    The key may be an :class:`ItemKey` (epoch and repeat travel with it, as :class:`EpochSampler`
    yields them) or a plain int (epoch from :meth:`set_epoch`, repeat 0). The same key always gives
    the same crops, in the main process or in any worker.
    """

    def __init__(self, data: Sequence[dict], transform: Any, seed: int = 0) -> None:
        if not data:
            raise ValueError("no cases")
        if not hasattr(transform, "set_random_state"):
            raise ValueError("transform must be a MONAI Randomizable (e.g. Compose) with set_random_state")
        self.data = list(data)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain int keys."""
        self.epoch = int(epoch)

    def __getitem__(self, key: int) -> Any:
        i = int(key)
        epoch, repeat = getattr(key, "epoch", self.epoch), getattr(key, "repeat", 0)
        self.transform.set_random_state(seed=item_seed(self.seed, epoch, i, repeat))
        return self.transform(self.data[i])


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (same shuffle from ``seed + epoch``, same padding and sharding) whose
    indices are :class:`ItemKey` s carrying the epoch, and which can start a pass mid-epoch.

    ``skip_next(k)``: the next pass leaves out this rank's first ``k`` items (a resumed run skips
    the batches it had consumed without loading them). ``len()`` stays the full per-rank length.
    The order is built when ``iter()`` is called, so later ``set_epoch`` calls do not touch a pass
    already started.
    """

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip = 0

    def skip_next(self, items: int) -> None:
        """Leave out the first ``items`` items of this rank in the next pass only."""
        if items < 0:
            raise ValueError(f"items must be >= 0, got {items}")
        self._skip = int(items)

    def __iter__(self) -> Iterator[ItemKey]:
        n = len(self.dataset)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        # DistributedSampler pads by cycling through the order: padded position p holds order[p % n]
        mine = [ItemKey(order[p % n], self.epoch, p // n) for p in range(self.rank, self.total_size, self.num_replicas)]
        skip, self._skip = self._skip, 0
        return iter(mine[skip:])


def _dist_info(distributed: tuple[int, int] | bool | None) -> tuple[int, int]:
    """(rank, world) from an explicit pair, or from torch.distributed when initialised."""
    if distributed is False:
        return 0, 1
    if distributed is None or distributed is True:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        if distributed is True:
            raise ValueError("distributed=True but torch.distributed is not initialised")
        return 0, 1
    rank, world = (int(v) for v in distributed)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"distributed must be (rank, world) with 0 <= rank < world, got {distributed}")
    return rank, world


def build_train_dataset(cache_dir: str | os.PathLike, case_ids: Sequence[str] | None = None, *,
                        crop_size: int | Sequence[int] = (96, 96, 96), num_crops: int = 4,
                        labeled: bool | None = None, augment: bool = True, seed: int = 0,
                        **sampler_kwargs: Any) -> CropDataset:
    """:class:`CropDataset` over cache cases; item i is a list of ``num_crops`` crop dicts of case i.

    Each dict: ``image`` float32 (C, *crop_size), ``label`` int64 (1, *crop_size) when labeled.
    ``labeled=None``: labeled if every selected case has a label; ``labeled=False`` ignores labels
    (pre-training). The crops and augmentation of an item are a function of (``seed``, epoch,
    index). Extra keyword arguments go to ``CacheCropSampled`` (pos, neg, thresholds...).
    """
    cases = _select_cases(cache_dir, case_ids)
    with_label = [c["label"] is not None for c in cases]
    if labeled is None:
        if any(with_label) and not all(with_label):
            raise ValueError(f"{sum(with_label)} of {len(cases)} selected cases have labels: pass labeled=False "
                             "to ignore labels or select only labeled cases")
        labeled = all(with_label)
    elif labeled and not all(with_label):
        missing = [c["id"] for c, w in zip(cases, with_label) if not w]
        raise ValueError(f"labeled=True but cases {missing[:10]} have no label")
    return CropDataset(cases, train_transforms(crop_size, num_crops, bool(labeled), augment, **sampler_kwargs),
                       seed=seed)


def build_train_loader(cache_dir: str | os.PathLike, case_ids: Sequence[str] | None = None, *,
                       crop_size: int | Sequence[int] = (96, 96, 96), num_crops: int = 4, batch_size: int = 2,
                       labeled: bool | None = None, augment: bool = True, num_workers: int = 2, seed: int = 0,
                       distributed: tuple[int, int] | bool | None = None, drop_last: bool = False,
                       pin_memory: bool = False, **sampler_kwargs: Any) -> torch.utils.data.DataLoader:
    """Shuffled training ``DataLoader`` of random crops from the cache.

    ``batch_size`` counts *volumes*: each volume yields ``num_crops`` crops, so a batch is
    ``{"image": float32 (batch_size * num_crops, C, *crop_size), "label": int64 (same, 1, *crop_size)}``
    (``label`` only when labeled; the last batch may hold fewer volumes unless ``drop_last``).

    Sharding: with torch.distributed initialised (or ``distributed=(rank, world)``) each rank
    reads its shard through an :class:`EpochSampler` (a ``DistributedSampler``, padded to equal
    length, so every rank runs the same number of steps); otherwise a one-replica sampler shuffles.
    Call ``loader.sampler.set_epoch(epoch)`` every epoch (``infinite_batches`` does it).

    Reproducible for a given ``seed`` whatever ``num_workers``: the shuffle uses ``seed`` + epoch,
    and each item's crops and augmentation are seeded from (``seed``, epoch, index), so they do not
    depend on which worker loads them or on what was loaded before. A resumed run starts mid-epoch
    with ``loader.sampler.skip_next(batches * batch_size)``.
    """
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    rank, world = _dist_info(distributed)
    dataset = build_train_dataset(cache_dir, case_ids, crop_size=crop_size, num_crops=num_crops, labeled=labeled,
                                  augment=augment, seed=seed, **sampler_kwargs)
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, seed=seed)
    # the loader draws its workers' base seed from this generator, not from the global one (which the
    # model's masks use); items seed themselves, so the value does not matter
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1_000_003 + rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_crops, generator=generator, drop_last=drop_last,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)


def infinite_batches(loader: torch.utils.data.DataLoader, start_epoch: int = 0) -> Iterator[dict]:
    """Yield batches forever for iteration-based training, calling ``sampler.set_epoch`` each pass."""
    epoch = start_epoch
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the loader yielded no batch (fewer volumes than batch_size with drop_last?)")
        epoch += 1


def shard_indices(n: int, distributed: tuple[int, int] | bool | None = None) -> list[int]:
    """Indices ``rank::world`` of ``n`` items: disjoint shards that together cover all (for evaluation)."""
    rank, world = _dist_info(distributed)
    return list(range(rank, n, world))


class CacheEvalDataset(TorchDataset):
    """Whole cached volumes for sliding-window validation.

    Item: ``{"image": float32 tensor (C, X, Y, Z), "label": int64 tensor (1, X, Y, Z)`` (only when
    the case has one), ``"case_id": str, "meta_path": str | None}``.
    """

    def __init__(self, cases: Sequence[dict]) -> None:
        if not cases:
            raise ValueError("no cases")
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        c = self.cases[i]
        image = np.load(c["image"])
        if image.ndim != 4:
            raise ValueError(f"{c['image']}: expected (C, X, Y, Z), got shape {image.shape}")
        item: dict[Hashable, Any] = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                                     "case_id": c["id"], "meta_path": c["meta"]}
        if c["label"]:
            label = np.load(c["label"])
            if label.shape != image.shape[1:]:
                raise ValueError(f"{c['label']}: label shape {label.shape} != image shape {image.shape[1:]}")
            item["label"] = torch.from_numpy(label.astype(np.int64))[None]
        return item


def build_eval_dataset(cache_dir: str | os.PathLike, case_ids: Sequence[str] | None = None) -> CacheEvalDataset:
    """Whole-volume dataset of the given cases (all when None); see ``CacheEvalDataset``.

    Use ``torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=lambda b: b[0])`` or index it
    directly; under DDP, ``torch.utils.data.Subset(ds, shard_indices(len(ds)))`` gives each rank
    a disjoint part.
    """
    return CacheEvalDataset(_select_cases(cache_dir, case_ids))
