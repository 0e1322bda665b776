import pytest
import torch

from mambamim.models import create_model, list_models, model_config

TINY = dict(size="tiny")


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(32, 32, 32), (16, 32, 16)])
def test_output_shape_cubic_and_non_cubic(name, shape):
    model = create_model(name, in_channels=2, num_classes=3, **TINY)
    y = model(torch.randn(1, 2, *shape))
    assert y.shape == (1, 3, *shape)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, **TINY)
    model(torch.randn(1, 1, 16, 32, 32)).square().mean().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for k, p in model.named_parameters() if k.endswith("weight"))


@pytest.mark.parametrize("name", ["hymamba", "vim_unetr"])
def test_reproducible_under_seed(name):
    x = torch.randn(1, 1, 16, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(create_model(name, num_classes=2, **TINY)(x))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(8)
    assert not torch.allclose(outs[0], create_model(name, num_classes=2, **TINY)(x))


def test_reference_hymamba_size_matches_the_authors_within_ten_percent():
    model = create_model("hymamba", in_channels=1, num_classes=14)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 41.8e6) / 41.8e6 < 0.10, n
    mamba = model.encoder.mamba
    assert len(mamba.layers) == 4 and mamba.dim == 384


def test_reference_vim_unetr_configuration():
    model = create_model("vim_unetr", num_classes=14)
    assert model.encoder.out_channels == 768 and model.encoder.depth == 12
    assert model.taps == (3, 6, 9)


@pytest.mark.parametrize("scan", ["raster", "zigzag", "hilbert", "shuffle"])
def test_scan_order_is_an_argument(scan):
    model = create_model("hymamba", scan=scan, num_classes=2, **TINY).eval()
    assert model.encoder.mamba.scan.order == scan
    assert model(torch.randn(1, 1, 16, 32, 32)).shape == (1, 2, 16, 32, 32)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet")
    with pytest.raises(ValueError, match="unknown size"):
        create_model("hymamba", size="huge")
    with pytest.raises(ValueError, match="widths needs 4"):
        create_model("hymamba", widths=(8, 16))
    model = create_model("hymamba", **TINY)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 1, 20, 32, 32))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 32, 32, 32))


def test_registry_lists_models_and_configs_are_data():
    assert {"hymamba", "vim_unetr", "mednext_cnn"} <= set(list_models())
    assert model_config("hymamba", "tiny", num_classes=3)["num_classes"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("scan", ["raster", "hilbert"])
def test_compiled_model_traces_once_and_matches_eager(scan):
    # The scan permutation and position embedding used to be cached on the module: filling the cache
    # inside the compiled graph failed Dynamo's guard and recompiled the whole model at its second call.
    # AOT autograd (what Inductor builds on) also checks how trace-time constants enter the graph.
    torch._dynamo.reset()  # no frame state (e.g. shapes marked dynamic) left by other tests' compiles
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch.manual_seed(0)
    model = create_model("hymamba", size="tiny", num_classes=2, scan=scan)
    compiled = torch.compile(model, backend=recording_backend)
    x = torch.rand(1, 1, 32, 48, 32)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    compiled(x)
    assert len(graphs) == 1
