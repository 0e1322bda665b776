"""Training-crop throughput: mambamim cache loader vs MONAI's usual load-from-NIfTI pipeline.

Self-contained: writes a synthetic phantom set (``mambamim.data.synth``) in a temporary folder,
builds the preprocessed cache (``mambamim.data.prepare`` when importable, else an equivalent
MONAI-transform + numpy writer here), then times, in the same run and on the same data:

* ``mambamim cache``: ``build_train_loader`` (memory-mapped crops, Swin UNETR augmentations),
  for several worker counts;
* ``MONAI nii``: Dataset with LoadImaged, EnsureChannelFirstd, Orientationd(RAS), Spacingd(1.5 mm),
  ScaleIntensityRanged(-175..250 -> 0..1), CropForegroundd, RandCropByPosNegLabeld(1:1) and the
  same augmentations (the Swin UNETR BTCV recipe), for the same worker counts;
* optionally ``MONAI CacheDataset``: the same pipeline with the deterministic part cached in RAM
  (its build time is reported separately).

Throughput is crops per second after the first batch (which includes worker start-up and is
reported on its own). Example (small settings)::

    python benchmarks/bench_loader.py --num 6 --batches 6 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel RAS convention, stated to silence a MONAI warning


def _write_cache_fallback(raw: str, cache: str, spacing: float = 1.5) -> None:
    """Minimal cache writer (used when mambamim.data.prepare is not importable)."""
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd,
                                  ScaleIntensityRanged, Spacingd)

    with open(os.path.join(raw, "dataset.json")) as f:
        ds = json.load(f)
    tf = Compose([
        LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS", labels=_LABELS),
        Spacingd(keys=["image", "label"], pixdim=(spacing,) * 3, mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=["image", "label"], source_key="image"),
    ])
    cases = []
    for e in ds["training"]:
        cid = os.path.basename(e["image"]).replace(".nii.gz", "")
        d = tf({"image": os.path.join(raw, e["image"]), "label": os.path.join(raw, e["label"])})
        out = os.path.join(cache, "cases", cid)
        os.makedirs(out, exist_ok=True)
        image = np.asarray(d["image"], dtype=np.float32)
        np.save(os.path.join(out, "image.npy"), image)
        np.save(os.path.join(out, "label.npy"), np.asarray(d["label"][0], dtype=np.uint8))
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump({"id": cid}, f)
        cases.append({"id": cid, "image": f"cases/{cid}/image.npy", "label": f"cases/{cid}/label.npy",
                      "meta": f"cases/{cid}/meta.json", "shape": list(image.shape)})
    with open(os.path.join(cache, "dataset.json"), "w") as f:
        json.dump({"format": "mambamim-cache", "version": 1, "preprocessing": {"spacing": [spacing] * 3},
                   "labels": ds["labels"], "cases": cases}, f)


def build_cache(raw: str, cache: str, workers: int) -> str:
    """Prepare the cache; returns which writer was used."""
    try:
        from mambamim.data.prepare import prepare_dataset
    except ImportError:
        _write_cache_fallback(raw, cache)
        return "benchmark's own MONAI+numpy writer"
    report = prepare_dataset(os.path.join(raw, "dataset.json"), cache, workers=workers, progress=False)
    if report.failed:
        raise RuntimeError(f"prepare failed: {report.failed}")
    return "mambamim.data.prepare"


def monai_transforms(crop: int, num_crops: int, cached_part: bool):
    """(deterministic, random) MONAI transform lists of the Swin UNETR BTCV recipe."""
    from monai.transforms import (CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd, RandCropByPosNegLabeld,
                                  RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd,
                                  ScaleIntensityRanged, Spacingd)

    keys = ["image", "label"]
    det = [LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), Orientationd(keys=keys, axcodes="RAS", labels=_LABELS),
           Spacingd(keys=keys, pixdim=(1.5, 1.5, 1.5), mode=("bilinear", "nearest")),
           ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
           CropForegroundd(keys=keys, source_key="image")]
    rand = [RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=(crop,) * 3, pos=1, neg=1,
                                   num_samples=num_crops, image_key="image", image_threshold=0),
            RandFlipd(keys=keys, prob=0.1, spatial_axis=0), RandFlipd(keys=keys, prob=0.1, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.1, spatial_axis=2), RandRotate90d(keys=keys, prob=0.1, max_k=3),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1)]
    return det, rand


def time_loader(batches_iter, n_batches: int) -> tuple[float, float, int]:
    """(first-batch seconds, crops/s over the next n_batches, crops counted)."""
    t0 = time.perf_counter()
    first = next(batches_iter)
    t_first = time.perf_counter() - t0
    assert first["image"].ndim == 5
    n = 0
    t1 = time.perf_counter()
    for _ in range(n_batches):
        n += int(next(batches_iter)["image"].shape[0])
    return t_first, n / (time.perf_counter() - t1), n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=8, help="synthetic volumes (default 8)")
    p.add_argument("--crop", type=int, default=96, help="crop edge in voxels (default 96)")
    p.add_argument("--num-crops", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2, help="volumes per batch (default 2)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per configuration (default 8)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--monai-workers", type=int, nargs="+", default=None, help="default: same as --workers")
    p.add_argument("--no-monai-cache", action="store_true", help="skip the MONAI CacheDataset row")
    p.add_argument("--keep", default=None, help="keep the synthetic data and cache in this folder")
    args = p.parse_args(argv)

    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.transforms import Compose

    from mambamim.data.loaders import build_train_loader, infinite_batches
    from mambamim.data.synth import synth_dataset

    root = args.keep or tempfile.mkdtemp(prefix="bench_loader_")
    raw, cache = os.path.join(root, "raw"), os.path.join(root, "cache")
    rows = []
    try:
        t = time.perf_counter()
        synth_dataset(raw, num=args.num, seed=0, workers=min(2, os.cpu_count() or 1))
        t_synth = time.perf_counter() - t
        t = time.perf_counter()
        writer = build_cache(raw, cache, workers=min(2, os.cpu_count() or 1))
        t_cache = time.perf_counter() - t
        shapes = [c["shape"][1:] for c in json.load(open(os.path.join(cache, "dataset.json")))["cases"]]
        print(f"{args.num} volumes: synth {t_synth:.1f} s, cache ({writer}) {t_cache:.1f} s; "
              f"cached shapes at 1.5 mm e.g. {shapes[:3]}", flush=True)

        for w in args.workers:
            loader = build_train_loader(cache, crop_size=(args.crop,) * 3, num_crops=args.num_crops,
                                        batch_size=args.batch_size, num_workers=w, seed=0)
            first, cps, n = time_loader(infinite_batches(loader), args.batches)
            rows.append(("mambamim cache (mmap crops)", w, first, cps, n))
            print(rows[-1], flush=True)
            del loader

        with open(os.path.join(raw, "dataset.json")) as f:
            entries = [{"image": os.path.join(raw, e["image"]), "label": os.path.join(raw, e["label"])}
                       for e in json.load(f)["training"]]
        det, rand = monai_transforms(args.crop, args.num_crops, False)

        def monai_iter(ds, w):
            g = torch.Generator()
            g.manual_seed(0)
            dl = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=w, generator=g,
                            persistent_workers=w > 0)
            while True:
                yield from dl

        for w in args.monai_workers if args.monai_workers is not None else args.workers:
            first, cps, n = time_loader(monai_iter(Dataset(entries, Compose(det + rand)), w), args.batches)
            rows.append(("MONAI nii (Load..Spacingd..RandCropByPosNegLabeld)", w, first, cps, n))
            print(rows[-1], flush=True)
        if not args.no_monai_cache:
            t = time.perf_counter()
            cds = CacheDataset(entries, Compose(det + rand), cache_rate=1.0, num_workers=min(2, os.cpu_count() or 1),
                               progress=False)
            t_build = time.perf_counter() - t
            w = max(args.monai_workers if args.monai_workers is not None else args.workers)
            first, cps, n = time_loader(monai_iter(cds, w), args.batches)
            rows.append((f"MONAI CacheDataset (RAM; build {t_build:.1f} s)", w, first, cps, n))
            print(rows[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    base = {w: cps for name, w, _, cps, _ in rows if name.startswith("MONAI nii")}
    print()
    print(f"date: {datetime.date.today()}  machine: {platform.machine()} {os.cpu_count()}-core CPU, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"command: python {' '.join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}")
    print(f"crop {args.crop}^3, {args.num_crops} crops per volume, batch {args.batch_size} volumes "
          f"({args.batch_size * args.num_crops} crops), {args.batches} timed batches, {args.num} synthetic volumes\n")
    print("| pipeline | workers | first batch (s) | crops/s | vs MONAI nii, same workers |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, w, first, cps, _ in rows:
        ratio = f"{cps / base[w]:.1f}x" if w in base else "-"
        print(f"| {name} | {w} | {first:.2f} | {cps:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
