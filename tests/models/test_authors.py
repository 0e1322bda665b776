"""The ``authors`` preset and the converter against an independent re-implementation of the authors'
encoder (tests/models/authors_reference.py) and their checkpoint's names and shapes."""

import pytest
import torch

from mambamim.models import convert_authors_state, create_model, load_pretrained_encoder
from mambamim.models.pretrained import AUTHORS_MODEL
from mambamim.pretrain import create_pretrainer

from authors_reference import authors_encoder, authors_tensor_table, position_table, random_authors_state


@pytest.fixture(scope="module")
def authors_state():
    return random_authors_state()


@pytest.fixture(scope="module")
def converted(authors_state):
    return convert_authors_state(authors_state)


def test_the_preset_has_the_authors_sizes():
    model = create_model("hymamba", size="authors", num_classes=14)
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    # build_hybird: 41,841,134 numbers, of which 82,944 are the position table (a buffer-like constant here)
    # and 316,416 the never-read backward mixer tensors (absent from a one-directional mixer).
    assert total == 41_841_134 - 82_944 - 316_416
    assert total - encoder == 19_115_758  # the authors' decoder, tensor for tensor
    assert len(authors_tensor_table()) == 196


def test_conversion_places_every_tensor_and_names_what_it_drops(authors_state, converted):
    state, report = converted
    assert report.ok, report.summary()
    assert len(report.converted) == 166 and len(report.dropped) == 30
    assert sum("backward-direction" in why for why in report.dropped.values()) == 28
    assert "mae.mask_token" in report.dropped and "mae.pos_embed" in report.dropped
    enc = create_model("hymamba", size="authors").encoder
    enc.load_state_dict(state, strict=True)
    own = enc.state_dict()
    for src, dst in report.converted.items():
        assert torch.equal(own[dst], authors_state[src])


def test_features_equal_the_authors_encoder(authors_state, converted):
    state, _ = converted
    enc = create_model("hymamba", size="authors").encoder.double().eval()
    enc.load_state_dict({k: v.double() for k, v in state.items()})
    x = torch.rand(1, 1, 32, 32, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p64 = {k: v.double() for k, v in authors_state.items()}
    with torch.no_grad():
        ours, ref = enc(x), authors_encoder(x, p64)
        ours32 = create_model("hymamba", size="authors").encoder.eval()
        ours32.load_state_dict(state)
        f32 = ours32(x.float())
    assert len(ours) == len(ref) == 5
    for level, (a, b, c) in enumerate(zip(ours, ref, f32)):
        assert a.shape == b.shape, level
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(c.double(), b, rtol=1e-4, atol=1e-4)


def test_the_position_table_and_token_order_are_the_authors():
    from mambamim.layers.posembed import sincos_pos_embed_3d

    torch.testing.assert_close(sincos_pos_embed_3d((6, 6, 6), 384).double(), position_table(6, 384))


def test_round_trip_through_the_cli_and_load_pretrained_encoder(tmp_path, authors_state, converted):
    from mambamim.cli.main import main

    src = tmp_path / "hybird_ct_pretrained_timm_style_mask75.pth"
    torch.save(authors_state, src)
    out = tmp_path / "encoder.pt"
    assert main(["convert", "authors", str(src), str(out)]) == 0
    enc = load_pretrained_encoder(out)
    for k, v in converted[0].items():
        assert torch.equal(enc.state_dict()[k], v)
    # The resume file (whole pre-training model under "module", prefix sparse_encoder.) converts the same.
    resume = {"module": {**{f"sparse_encoder.{k}": v for k, v in authors_state.items()},
                         "A_interpolation": torch.zeros(1, 384, 384)}, "epoch": 3, "arch": "mambamim"}
    torch.save(resume, tmp_path / "withdecoder.pth")
    assert main(["convert", "authors", str(tmp_path / "withdecoder.pth"), str(tmp_path / "b.pt")]) == 0
    assert main(["convert", "authors", str(src), str(out)]) != 0  # refuses to overwrite
    assert main(["convert", "authors", str(src), str(out), "--overwrite"]) == 0


def test_unknown_missing_and_mismatched_tensors_are_named(authors_state):
    bad = dict(authors_state)
    bad.pop("embeddings.encoder4.conv1.weight")
    bad["embeddings.stem.weight"] = torch.zeros(16, 1, 3, 3, 3)
    bad["embeddings.extra.weight"] = torch.zeros(3)
    _, report = convert_authors_state(bad)
    assert not report.ok
    assert report.missing == ["skip_blocks.3.conv1.weight"]
    assert report.unknown == ["embeddings.extra.weight"]
    assert report.mismatched[0][0] == "embeddings.stem.weight"
    text = report.summary()
    assert "skip_blocks.3.conv1.weight" in text and "embeddings.extra.weight" in text


def test_a_wrong_position_table_is_refused(authors_state):
    bad = dict(authors_state, **{"mae.pos_embed": torch.randn(1, 216, 384)})
    with pytest.raises(ValueError, match="sin-cos"):
        convert_authors_state(bad)


def test_sparse_path_with_nothing_masked_is_the_dense_encoder(converted):
    pre = create_pretrainer("hymamba", size="authors", sparse_full_res=True).double()
    pre.encoder.load_state_dict({k: v.double() for k, v in converted[0].items()})
    x = torch.rand(2, 1, 32, 32, 32, dtype=torch.float64)
    everything = torch.ones(2, 2, 2, 2, dtype=torch.bool)
    from mambamim.masking import stage_masks

    masks = stage_masks(everything, x.shape[2:], 5, x.dtype)
    from mambamim.masking import scatter_blocks

    with torch.no_grad():
        sparse = pre.encoder.forward_cnn(x, masks, visible_blocks=(everything, 8))
        dense = pre.encoder.forward_cnn(x, None)
    sparse[0] = scatter_blocks(sparse[0], everything, 8)  # the full-resolution level comes as its cells
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_converted_model_description_builds_the_preset():
    enc = create_model(AUTHORS_MODEL["name"], **AUTHORS_MODEL["kwargs"]).encoder
    assert enc.mamba is not None and not enc.mamba.layers[0].mixer.bidirectional
