"""The real cache loader's batches are replayed exactly on resume. Its order is a function of (seed,
epoch) and each item of (seed, epoch, index), so a fresh loader gives the same batches with or without
the captured random state."""

from __future__ import annotations

import torch

from engine_standins import make_tiny_cache
from mambamim.engine.checkpoint import capture_rng_state, restore_rng_state
from mambamim.engine.schedule import capture_loader_rng, open_epoch, restore_loader_rng


def _loader(cache):
    from mambamim.data.loaders import build_train_loader

    return build_train_loader(cache, None, crop_size=(16, 16, 16), num_crops=2, batch_size=1, labeled=True,
                              augment=True, num_workers=0, seed=0, distributed=False)


def test_real_loader_replay_is_exact(tmp_path):
    cache = make_tiny_cache(tmp_path, num=3)
    torch.manual_seed(0)
    a = _loader(cache)
    list(open_epoch(a, 0))  # epoch 0 consumed: the transforms' RandomStates moved on
    start = (capture_rng_state(), capture_loader_rng(a))
    assert len(start[1]["transforms"]) >= 2  # crop sampler + augmentations found
    it = open_epoch(a, 1)
    next(it)
    now = (capture_rng_state(), capture_loader_rng(a))
    expected = next(it)

    torch.manual_seed(123)
    b = _loader(cache)  # a fresh process: different state everywhere
    restore_rng_state(start[0])
    restore_loader_rng(b, start[1])
    it_b = open_epoch(b, 1, skip=1)
    restore_rng_state(now[0])
    restore_loader_rng(b, now[1])
    got = next(it_b)
    assert torch.equal(got["image"], expected["image"]) and torch.equal(got["label"], expected["label"])

    c = _loader(cache)  # without any restore, too: nothing depends on the loader's history
    torch.manual_seed(7)
    same = next(open_epoch(c, 1, skip=1))
    assert torch.equal(same["image"], expected["image"]) and torch.equal(same["label"], expected["label"])
    other = next(open_epoch(c, 2, skip=1))  # another epoch: other crops (the test can fail)
    assert not torch.equal(other["image"], expected["image"])
