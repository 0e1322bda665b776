"""Sliding-window inference (mambamim.inference): blending, flip TTA, the compiled segmenter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mambamim.inference import flip_sets, predict_volume


class Threshold(nn.Module):
    """Pointwise toy segmenter: class 1 where the first channel exceeds ``t``."""

    def __init__(self, t: float = 0.5):
        super().__init__()
        self.t = t
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        d = (x[:, :1] - self.t) * self.scale
        return torch.cat([-d, d], 1)


def test_threshold_model_exact_on_odd_sized_volume():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 37, 21, 50, generator=g)
    labels = predict_volume(Threshold(), img, roi=(16, 16, 16), overlap=0.5, sw_batch_size=3, output="labels")
    assert labels.shape == (37, 21, 50) and labels.dtype == torch.int64
    assert torch.equal(labels, (img[0] > 0.5).long())
    probs = predict_volume(Threshold(), img, roi=(16, 16, 16), overlap=0.25)
    assert probs.shape == (2, 37, 21, 50)
    assert torch.allclose(probs.sum(0), torch.ones(37, 21, 50), atol=1e-5)
    expected = torch.sigmoid(2 * 20.0 * (img[0] - 0.5))
    assert torch.allclose(probs[1], expected, atol=1e-4)


def test_flip_sets():
    assert flip_sets(False) == [()]
    assert len(flip_sets("axes")) == 4
    all8 = flip_sets(True)
    assert len(all8) == 8 and len(set(all8)) == 8 and all8[0] == ()
    with pytest.raises(ValueError):
        flip_sets("sideways")


def test_tta_averages_flipped_passes():
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 3, 3, padding=1)  # not flip-equivariant
    img = torch.rand(1, 16, 16, 16)
    got = predict_volume(conv, img, roi=(16, 16, 16), tta_flips="axes")
    with torch.no_grad():
        x = img[None]
        ref = sum(torch.flip(torch.softmax(conv(torch.flip(x, a)), 1), a) for a in [(2,), (3,), (4,)])
        ref = (ref + torch.softmax(conv(x), 1)) / 4
    assert torch.allclose(got, ref[0], atol=1e-5)
    plain = predict_volume(conv, img, roi=(16, 16, 16))
    assert not torch.allclose(plain, got, atol=1e-4)
    # a pointwise model is flip-equivariant: TTA changes nothing
    t_all = predict_volume(Threshold(), img, roi=(16, 16, 16), tta_flips=True)
    assert torch.allclose(t_all, predict_volume(Threshold(), img, roi=(16, 16, 16)), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        predict_volume(Threshold(), torch.rand(8, 8, 8), roi=(16, 16, 16))
    with pytest.raises(ValueError, match="overlap"):
        predict_volume(Threshold(), torch.rand(1, 8, 8, 8), roi=(16, 16, 16), overlap=1.0)


@pytest.mark.slow
def test_compiled_segmenter_matches_eager_and_falls_back(monkeypatch, caplog):
    """``compile_segmenter`` (the ``--compile`` of predict / evaluate) gives the eager network's probabilities,
    through Dynamo for three window batch sizes (7 windows in passes of 3: 3, 3, 1), and keeps going eagerly
    when compiling fails. Dynamo with its eager backend keeps the test fast; the GPU benchmark compiles with
    Inductor."""
    import functools

    from mambamim.inference import CompiledSegmenter, compile_segmenter
    from mambamim.models import create_model

    torch.manual_seed(0)
    net = create_model("hymamba", size="tiny", num_classes=3).eval()
    img = torch.rand(1, 40, 36, 33)
    kw = dict(roi=(32, 32, 32), overlap=0.25, sw_batch_size=3)
    ref = predict_volume(net, img, **kw)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="eager"))
    wrapped = compile_segmenter(net)
    assert isinstance(wrapped, CompiledSegmenter) and compile_segmenter(wrapped) is wrapped
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in net.state_dict()}
    torch._dynamo.reset()
    try:
        assert torch.allclose(predict_volume(wrapped, img, **kw), ref, atol=1e-5)
        assert wrapped._run is not None and wrapped._run.state is True
    finally:
        torch._dynamo.reset()  # the window batch sizes marked shapes dynamic for HyMamba's forward

    def broken(model):
        def fail(x):
            raise RuntimeError("inductor exploded")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level("WARNING"):
        out = predict_volume(compile_segmenter(net), img, **kw)
    assert torch.allclose(out, ref, atol=1e-6)
    assert "inductor exploded" in caplog.text and "inference continues without it" in caplog.text
