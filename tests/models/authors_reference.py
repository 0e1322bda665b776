"""An independent, plain float64 re-implementation of the authors' dense MambaMIM encoder, written from
../shared/authors/README.md (sections 3 and 4) over the authors' own tensor names. It shares no code
with the package, so agreement with our ``authors`` preset checks the preset and the converter."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

# A copy of ../shared/authors/encoder_state_dict.tsv (every tensor's name and shape), kept with the tests.
TSV = Path(__file__).with_name("authors_encoder_state_dict.tsv")


def authors_tensor_table() -> list[tuple[str, tuple[int, ...]]]:
    with open(TSV) as handle:
        return [(r["name"], tuple(int(s) for s in r["shape"].split("x"))) for r in csv.DictReader(handle, delimiter="\t")]


def random_authors_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the authors' checkpoint with its listed name and shape, random but well scaled
    (norm weights near 1, A_log as initialised, the position table as the README defines it)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in authors_tensor_table():
        if name == "mae.pos_embed":
            state[name] = position_table(6, shape[-1])[None].float()
        elif "A_log" in name or "A_b_log" in name:
            state[name] = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif "norm" in name and name.endswith("weight"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[name] = torch.randn(shape, generator=g) * (0.02 if len(shape) == 1 else fan_in**-0.5)
    return state


def position_table(side: int, dim: int) -> torch.Tensor:
    """(side^3, dim): channels [sin(h w_k), cos(h w_k), sin(w w_k), cos(w w_k), sin(d w_k), cos(d w_k)],
    w_k = 10000^(-k / (dim / 6)), token index 36 h + 6 w + d for side 6."""
    per = dim // 6
    omega = 10000.0 ** (-torch.arange(per, dtype=torch.float64) / per)
    h, w, d = torch.meshgrid(*(torch.arange(side, dtype=torch.float64),) * 3, indexing="ij")
    parts = []
    for axis in (h, w, d):
        angles = axis.flatten()[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def _ln_channels(x, p, name):
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), p[f"{name}.weight"], p[f"{name}.bias"], 1e-6).movedim(-1, 1)


def _conv(x, p, name, groups=1):
    w = p[f"{name}.weight"]
    return F.conv3d(x, w, p[f"{name}.bias"], padding=w.shape[-1] // 2, groups=groups)


def _mednext(x, p, name):
    y = _conv(x, p, f"{name}.conv1", groups=x.shape[1])
    y = _conv(F.gelu(_conv(_ln_channels(y, p, f"{name}.norm"), p, f"{name}.conv2")), p, f"{name}.conv3")
    return x + y


def _skip(x, p, name):
    y = F.leaky_relu(_ln_channels(_conv(x, p, f"{name}.conv1"), p, f"{name}.norm1"), 0.01)
    y = _ln_channels(_conv(y, p, f"{name}.conv2"), p, f"{name}.norm2")
    return F.leaky_relu(y + x, 0.01)


def _mixer(u, p, name):
    """One-directional Mamba mixer over (L, 384) tokens, a sequential scan."""
    L = u.shape[0]
    xz = u @ p[f"{name}.in_proj.weight"].T
    x, z = xz[:, :768], xz[:, 768:]
    conv_w, conv_b = p[f"{name}.conv1d.weight"], p[f"{name}.conv1d.bias"]
    x = F.conv1d(x.T[None], conv_w, conv_b, padding=3, groups=768)[0, :, :L].T
    x = F.silu(x)
    dbc = x @ p[f"{name}.x_proj.weight"].T
    dt, B, C = dbc[:, :24], dbc[:, 24:40], dbc[:, 40:56]
    delta = F.softplus(dt @ p[f"{name}.dt_proj.weight"].T + p[f"{name}.dt_proj.bias"])
    A = -torch.exp(p[f"{name}.A_log"])
    h = torch.zeros(768, 16, dtype=u.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(delta[t][:, None] * A) * h + delta[t][:, None] * B[t][None] * x[t][:, None]
        ys.append(h @ C[t] + p[f"{name}.D"] * x[t])
    y = torch.stack(ys) * F.silu(z)
    return y @ p[f"{name}.out_proj.weight"].T


def authors_encoder(x: torch.Tensor, p: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """x (1, 1, S, S, S) with S / 16 <= 6 -> [L0, L1, L2, L3, L4], float64."""
    e = _conv(_conv(x, p, "embeddings.stem"), p, "embeddings.expend1")
    feats = [_skip(e, p, "embeddings.encoder1")]
    h = F.max_pool3d(e, 2)
    for level, depth in ((2, 2), (3, 2), (4, 2)):
        for i in range(depth):
            h = _mednext(h, p, f"embeddings.layer{level}.{i}")
        e = _conv(h, p, f"embeddings.expend{level}")
        feats.append(_skip(e, p, f"embeddings.encoder{level}"))
        h = F.max_pool3d(e, 2)
    h = _mednext(h, p, "embeddings.layer5.0")
    grid = h.shape[2:]
    tokens = h[0].flatten(1).T  # (L, 384), the last axis fastest
    hh, ww, dd = torch.meshgrid(*(torch.arange(s) for s in grid), indexing="ij")
    tokens = tokens + p["mae.pos_embed"][0][(36 * hh + 6 * ww + dd).flatten()]
    for i in range(4):
        b = f"mae.blocks.{i}"
        t = F.layer_norm(tokens, (384,), p[f"{b}.norm1.weight"], p[f"{b}.norm1.bias"], 1e-5)
        tokens = tokens + _mixer(t, p, f"{b}.mamba")
        t = F.layer_norm(tokens, (384,), p[f"{b}.norm2.weight"], p[f"{b}.norm2.bias"], 1e-5)
        t = F.gelu(t @ p[f"{b}.mlp.fc1.weight"].T + p[f"{b}.mlp.fc1.bias"])
        tokens = tokens + t @ p[f"{b}.mlp.fc2.weight"].T + p[f"{b}.mlp.fc2.bias"]
    feats.append(tokens.T.reshape(1, 384, *grid))
    return feats
