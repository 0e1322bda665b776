"""A tiny prepared cache on 6 mm voxels and fine-tuning run folders for the evaluate / compare CLI tests."""

from __future__ import annotations

import json

import numpy as np
import torch

from _cli_toys import phantom_hu, write_nifti

AFF6 = np.diag([6.0, 6.0, 6.0, 1.0])


def make_cache6(root, n=4):
    """Prepare ``n`` labeled phantom cases (odd ones labeled one voxel off) into ``root/cache``."""
    from mambamim.data.prepare import prepare_dataset
    from mambamim.data.preprocess import PreprocessParams

    raw = root / "raw"
    raw.mkdir()
    for i in range(n):
        hu = phantom_hu((20, 18, 12), seed=30 + i)
        lab = np.roll(hu > 37.5, i % 2, axis=0)
        write_nifti(raw / f"case{i}.nii.gz", hu, AFF6)
        write_nifti(raw / f"case{i}_seg.nii.gz", lab.astype(np.uint8), AFF6)
    params = PreprocessParams(spacing=[6.0], hu_min=-175.0, hu_max=250.0, crop_foreground=False, min_size=[16])
    report = prepare_dataset(raw, root / "cache", params, progress=False, log_problems=False)
    assert len(report.prepared) == n
    return root / "cache"


def make_run(run, split=None, checkpoint_split=None, data=None):
    """A fine-tuning run folder: checkpoints/best.pt (a stand-in), split.json and config.yaml when given."""
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"split": checkpoint_split} if checkpoint_split else {"x": 1}, run / "checkpoints" / "best.pt")
    if split is not None:
        (run / "split.json").write_text(json.dumps({"how": "fold 0 of 2", **split}))
    if data is not None:
        (run / "config.yaml").write_text(f"kind: finetune\ndata: {data}\nout: {run}\n")
    return run
