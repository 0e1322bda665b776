"""Fine-tuning validation is the inference users run: predict_volume (Gaussian blending) + the evaluation's Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mambamim.engine.finetune_loop import validate
from mambamim.inference import inference_amp, predict_volume
from mambamim.evaluation.metrics import case_metrics


def _evaluation_dice(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> list[float]:
    """What ``mambamim evaluate`` reports as Dice for classes 1..num_classes-1."""
    scores = case_metrics(pred.numpy(), gt.numpy(), (1.0, 1.0, 1.0), list(range(1, num_classes)))
    return [scores[c]["dice"] for c in range(1, num_classes)]


def test_validate_dice_is_predict_volume_plus_the_evaluation_dice():
    from mambamim.models import create_model

    torch.manual_seed(0)
    model = create_model("hymamba", size="tiny", num_classes=3)
    image = torch.randn(1, 40, 36, 32)
    pred = predict_volume(model, image, roi=(32, 32, 32), overlap=0.5, sw_batch_size=2, device="cpu",
                          amp=False, output="labels")
    gt = pred.clone()
    gt[:12] = (pred[:12] + 1) % 3  # a reference that overlaps the prediction only partly
    dataset = [{"image": image, "label": gt[None], "case_id": "case_a"}]
    model.train()

    (case, dice), = validate(model, dataset, [0], num_classes=3, roi=32, overlap=0.5, sw_batch_size=2,
                             device=torch.device("cpu"), amp="none")

    expected = _evaluation_dice(pred, gt, 3)
    assert case == "case_a" and model.training  # train mode is given back
    np.testing.assert_array_equal(dice, expected)  # exact (NaN == NaN here)
    assert any(0.0 < v < 1.0 for v in dice), dice  # not only the trivial 0 / 1 / NaN cases


class WindowPosition(nn.Module):
    """Logits that depend on where a voxel sits in its window: class 1 in the central half of every
    axis, class 2 a constant 0.5. Averaged over the (mostly border) overlapping windows class 2 wins;
    weighted towards each window's centre (Gaussian blending) class 1 wins for many voxels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *size = x.shape
        central = torch.ones(size, dtype=torch.bool)
        for axis, n in enumerate(size):
            i = torch.arange(n)
            keep = (i >= n // 4) & (i < n - n // 4)
            central &= keep.view([-1 if a == axis else 1 for a in range(3)])
        out = torch.zeros(b, 3, *size)
        out[:, 0] = -10.0
        out[:, 1] = central.float()
        out[:, 2] = 0.5
        return out


def test_validate_blends_windows_like_predict_volume_gaussian():
    image = torch.zeros(1, 32, 32, 32)
    kw = dict(roi=(16, 16, 16), overlap=0.5, output="labels")
    gaussian = predict_volume(WindowPosition(), image, mode="gaussian", **kw)
    constant = predict_volume(WindowPosition(), image, mode="constant", **kw)
    assert (gaussian != constant).sum() > 1000  # the stub tells the two blendings apart
    assert set(gaussian.unique().tolist()) == {1, 2}

    # the reference is the Gaussian-blended prediction: validation scores it perfect
    dataset = [{"image": image, "label": gaussian[None], "case_id": "c"}]
    (_, dice), = validate(WindowPosition(), dataset, [0], num_classes=3, roi=16, overlap=0.5)
    assert dice == [1.0, 1.0]
    assert all(v < 0.9 for v in _evaluation_dice(constant, gaussian, 3))  # what constant blending would score


def test_validation_precision_follows_the_training_loop_on_cuda_only():
    assert inference_amp(torch.device("cuda"), "bf16") == "bf16"
    assert inference_amp(torch.device("cuda"), "fp16") == "fp16"
    assert inference_amp(torch.device("cuda"), "none") == "none"
    assert inference_amp(torch.device("cuda"), "auto") == inference_amp(torch.device("cuda"), True) == "bf16"
    assert inference_amp(torch.device("cuda"), False) == "none"
    # on CPU predict_volume (and so `mambamim evaluate`) runs fp32 whatever the training loop used
    for amp in ("bf16", "auto", True):
        assert inference_amp(torch.device("cpu"), amp) == "none"
    with pytest.raises(ValueError):
        inference_amp(torch.device("cpu"), "fp8")


class AutocastRecorder(nn.Module):
    """Records whether each window ran under CPU autocast; predicts class 1 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)


def test_validate_on_cpu_scores_fp32_even_for_a_bf16_training_loop():
    image = torch.zeros(1, 16, 16, 16)
    dataset = [{"image": image, "label": torch.ones(1, 16, 16, 16, dtype=torch.int64), "case_id": "c"}]
    net = AutocastRecorder()
    assert validate(net, dataset, [0], num_classes=2, roi=16, amp="bf16") == [("c", [1.0])]
    assert net.seen == [False]
