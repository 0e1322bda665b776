"""case_dice (the fine-tuning validation's Dice) gives exactly case_metrics' Dice, conventions included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mambamim.evaluation.metrics import case_metrics
from mambamim.evaluation.report import case_dice


def test_case_dice_equals_case_metrics_dice_exactly():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 3, (20, 18, 16))
    pred = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, 3, gt.shape), gt)
    pred[pred == 2] = 4  # class 2 only in the reference (Dice 0), class 4 only in the prediction (Dice 0)
    labels = [1, 2, 3, 4]  # class 3 in neither (NaN)
    expected = [case_metrics(pred, gt, (1.0, 1.0, 1.0), labels)[c]["dice"] for c in labels]
    got = case_dice(torch.from_numpy(pred), torch.from_numpy(gt), labels)
    np.testing.assert_array_equal(got, expected)
    assert 0.0 < got[0] < 1.0 and got[1] == 0.0 and math.isnan(got[2]) and got[3] == 0.0


def test_case_dice_checks_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        case_dice(torch.zeros(4, 4, 4, dtype=torch.int64), torch.zeros(4, 4, 3, dtype=torch.int64), [1])
