"""The model registry: one entry per network feeds every tool; the patch size is one constant."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mambamim.models import (
    PATCH_SIZE,
    REGISTRY,
    create_encoder,
    create_model,
    get_entry,
    list_models,
    list_sizes,
    model_config,
)


def test_registry_module_imports_no_torch():
    code = "import sys, mambamim.models; print(','.join(m for m in ('torch', 'numpy', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_entries_are_named_as_registered_and_read_only():
    assert list_models() == sorted(REGISTRY)
    for name, entry in REGISTRY.items():
        assert entry.name == name and "base" in entry.sizes
        assert entry.default_crop % entry.patch_size == 0 and entry.patch_size == PATCH_SIZE
    with pytest.raises(TypeError):
        REGISTRY["x"] = REGISTRY["hymamba"]  # type: ignore[index]
    with pytest.raises(TypeError):
        REGISTRY["hymamba"].presets["tiny"]["widths"] = (1, 2, 3, 4)  # type: ignore[index]


@pytest.mark.parametrize("name", list_models())
def test_encoder_alone_has_the_network_encoders_keys_and_weights(name):
    torch.manual_seed(0)
    net = create_model(name, size="tiny", num_classes=3)
    torch.manual_seed(0)
    enc = create_encoder(name, size="tiny", num_classes=3)  # head arguments are ignored by the encoder
    assert type(enc) is type(net.encoder)
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in net.encoder.state_dict().items())
    assert enc.state_dict().keys() == net.encoder.state_dict().keys()


@pytest.mark.parametrize("name", list_models())
def test_a_side_not_divisible_by_the_patch_size_is_refused(name):
    model = create_model(name, size="tiny", num_classes=2)
    good = torch.randn(1, 1, PATCH_SIZE, 2 * PATCH_SIZE, PATCH_SIZE)
    assert model(good).shape == (1, 2, *good.shape[2:])
    with pytest.raises(ValueError, match=f"multiples of {PATCH_SIZE}"):
        model(torch.randn(1, 1, PATCH_SIZE, 2 * PATCH_SIZE + PATCH_SIZE // 2, PATCH_SIZE))


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds(name):
    for size in list_sizes(name):
        if size in ("base", "small", "authors"):
            assert model_config(name, size) == dict(get_entry(name).presets[size])
            continue  # building the big ones is covered elsewhere
        assert create_model(name, size=size, num_classes=2) is not None


def test_fixed_arguments_define_the_entry():
    cnn = create_model("mednext_cnn", size="tiny", mamba_depth=3)
    assert cnn.encoder.mamba is None  # the pure CNN stays a pure CNN


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet'; known models: hymamba, mednext_cnn, vim_unetr"):
        get_entry("resnet")
    with pytest.raises(ValueError, match="unknown size 'authors' for 'vim_unetr'"):
        create_model("vim_unetr", size="authors")


@pytest.mark.parametrize("name", ["hymamba", "vim_unetr"])
def test_channels_last_norms_is_a_module_option_that_changes_no_number(name):
    from mambamim.layers.sparse import SparseInstanceNorm3d

    torch.manual_seed(0)
    ours = create_model(name, size="tiny", num_classes=2).double().eval()
    torch.manual_seed(0)
    monai = create_model(name, size="tiny", num_classes=2, channels_last_norms=False).double().eval()
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in monai.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in ours.modules())
    assert any(isinstance(m, SparseInstanceNorm3d) for m in ours.modules())
    assert ours.state_dict().keys() == monai.state_dict().keys()
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), monai(x), atol=1e-9, rtol=1e-9)
