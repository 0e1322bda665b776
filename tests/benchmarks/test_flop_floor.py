"""benchmarks/flop_floor.py: MONAI's own window count and FLOP counts that obey the forward / backward ratio."""

from __future__ import annotations

import pytest

from _bench_loader import load_benchmark


@pytest.fixture(scope="module")
def ff():
    return load_benchmark("flop_floor")


def test_window_count_is_monais_tiling(ff):
    # 256 and 160 with a 96 window at overlap 0.5 (stride 48): 5 x 5 x 3 positions
    assert ff.window_count((256, 256, 160), 96, 0.5) == 75
    assert ff.window_count((96, 96, 96), 96, 0.5) == 1


def test_training_counts_about_three_forwards(ff):
    """A convolution's or matmul's backward costs two forwards (input and weight gradients): about three in
    all (less the stem's input gradient, which no one asks for; a little more for the CPU selective scan's
    batched matmuls)."""
    fwd = ff.finetune_flops("tiny", 32, train=False)
    train = ff.finetune_flops("tiny", 32, train=True)
    assert fwd > 0 and 2.8 * fwd < train < 3.2 * fwd
    # pre-training with the sparse encoder does less than with the dense one
    assert ff.pretrain_flops("tiny", 32, 2) < ff.pretrain_flops("tiny", 32, None)
