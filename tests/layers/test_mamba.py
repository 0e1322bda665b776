import torch

from mambamim.layers.mamba import MambaMixer


def test_parameter_names_and_shapes_follow_mamba():
    m = MambaMixer(32, d_state=16, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in m.named_parameters()}
    assert shapes["in_proj.weight"] == (128, 32)
    assert shapes["conv1d.weight"] == (64, 1, 4)
    assert shapes["x_proj.weight"] == (2 + 32, 64)  # dt_rank = ceil(32 / 16) = 2
    assert shapes["dt_proj.weight"] == (64, 2)
    assert shapes["A_log"] == (64, 16) and shapes["D"] == (64,)
    assert shapes["out_proj.weight"] == (32, 64)
    for name in ("conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.weight", "A_b_log", "D_b"):
        assert name in shapes
    assert "A_b_log" not in dict(MambaMixer(32, bidirectional=False).named_parameters())


def test_bidirectional_mixer_reads_both_ways():
    torch.manual_seed(0)
    x = torch.randn(1, 20, 16)
    x2 = x.clone()
    x2[:, -1] += 1.0
    bi = MambaMixer(16).eval()
    uni = MambaMixer(16, bidirectional=False).eval()
    with torch.no_grad():
        assert not torch.allclose(bi(x)[:, 0], bi(x2)[:, 0])
        assert torch.equal(uni(x)[:, 0], uni(x2)[:, 0])
        # The unidirectional mixer is causal: the last input reaches the last output.
        assert not torch.allclose(uni(x)[:, -1], uni(x2)[:, -1])


def test_initial_time_steps_in_range():
    m = MambaMixer(32, dt_min=0.001, dt_max=0.1)
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.99 and dt.max() <= 0.1 * 1.01
    assert torch.allclose(-torch.exp(m.A_log[0]), -torch.arange(1, 17).float())
