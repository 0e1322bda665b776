"""Pre-trained encoders: read any of our encoder checkpoints, and convert the authors' MambaMIM checkpoint.

The authors' pre-training writes a flat mapping of 196 tensors (``embeddings.*`` for the CNN, ``mae.*`` for
the Mamba stage; ../shared/authors/README.md lists every one). :func:`convert_authors_state` renames them
onto the ``authors`` preset of HyMamba, checks every shape, and names what it drops: the 28 tensors of the
backward direction that their one-directional ("v1") mixer creates but never reads, the pre-training mask
token, and the fixed position table (checked against the table we rebuild, then dropped: ours is computed).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mambamim.layers.posembed import sincos_pos_embed_3d

__all__ = [
    "AUTHORS_MODEL",
    "ConversionReport",
    "authors_to_ours",
    "convert_authors_state",
    "read_encoder_state",
    "load_pretrained_encoder",
]

# What a converted checkpoint rebuilds: ``create_model(**AUTHORS_MODEL["kwargs"])``'s encoder.
AUTHORS_MODEL: dict[str, Any] = {"name": "hymamba", "kwargs": {"in_channels": 1, "scan": "raster", "size": "authors"}}

_MEDNEXT = {"conv1": "dwconv", "norm": "norm", "conv2": "expand", "conv3": "compress"}
_BACKWARD = re.compile(r"mae\.blocks\.\d+\.mamba\.(A_b_log|D_b|conv1d_b|x_proj_b|dt_proj_b)(\..+)?")
_RULES: list[tuple[re.Pattern, Any]] = [
    (re.compile(r"embeddings\.stem\.(weight|bias)"), lambda m: f"stem.{m[1]}"),
    (re.compile(r"embeddings\.expend([1-4])\.(weight|bias)"), lambda m: f"widen.{int(m[1]) - 1}.conv.{m[2]}"),
    (re.compile(r"embeddings\.layer([2-5])\.(\d+)\.(conv1|norm|conv2|conv3)\.(weight|bias)"),
     lambda m: f"stages.{int(m[1]) - 2}.{m[2]}.{_MEDNEXT[m[3]]}.{m[4]}"),
    (re.compile(r"embeddings\.encoder([1-4])\.(conv1|conv2|norm1|norm2)\.(weight|bias)"),
     lambda m: f"skip_blocks.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (re.compile(r"mae\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)"), lambda m: f"mamba.layers.{m[1]}.{m[2]}.{m[3]}"),
    (re.compile(r"mae\.blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)"),
     lambda m: f"mamba.layers.{m[1]}.mlp.{0 if m[2] == '1' else 2}.{m[3]}"),
    (re.compile(r"mae\.blocks\.(\d+)\.mamba\.(.+)"), lambda m: f"mamba.layers.{m[1]}.mixer.{m[2]}"),
]  # fmt: skip


def authors_to_ours(name: str) -> str | None:
    """Our encoder's name for one of the authors' tensor names (None when it has no place)."""
    for pattern, rename in _RULES:
        match = pattern.fullmatch(name)
        if match:
            return rename(match)
    return None


@dataclass
class ConversionReport:
    """What :func:`convert_authors_state` did. ``dropped`` maps each dropped source name to the reason."""

    converted: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unknown or self.missing or self.mismatched)

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} tensors, dropped {len(self.dropped)}"]
        reasons: dict[str, int] = {}
        for why in self.dropped.values():
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"  dropped {n}: {why}" for why, n in reasons.items()]
        lines += [f"  unknown in the checkpoint: {k}" for k in self.unknown]
        lines += [f"  missing from the checkpoint: {k}" for k in self.missing]
        lines += [f"  shape mismatch {k}: checkpoint {a} vs ours {b}" for k, a, b in self.mismatched]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"converted": len(self.converted), "dropped": dict(self.dropped), "unknown": list(self.unknown),
                "missing": list(self.missing), "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched]}


def _unwrap_authors(state: Mapping[str, Any]) -> dict[str, Any]:
    """The flat encoder mapping, from itself or from the authors' resume file (``module`` +
    ``sparse_encoder.`` prefix)."""
    module = state.get("module")
    if isinstance(module, Mapping):
        return {k[len("sparse_encoder."):]: v for k, v in module.items() if k.startswith("sparse_encoder.")}
    return dict(state)


def _check_pos_embed(table: torch.Tensor, name: str) -> str:
    n, dim = table.shape[-2], table.shape[-1]
    side = round(n ** (1 / 3))
    if side**3 != n:
        raise ValueError(f"{name}: {n} tokens are not a cubic grid")
    ours = sincos_pos_embed_3d((side, side, side), dim)
    err = (table.reshape(n, dim).float() - ours).abs().max().item()
    if not math.isfinite(err) or err > 1e-4:
        raise ValueError(f"{name} differs from the 3D sin-cos table we rebuild (max difference {err:.3g}); "
                         "this checkpoint was not written by the authors' MambaMIM")  # fmt: skip
    return "fixed sin-cos position table: equal to the one we rebuild (max difference %.1e)" % err


def convert_authors_state(
    state: Mapping[str, Any], encoder: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename the authors' encoder tensors onto ours and check them against ``encoder``.

    Args:
        state: the authors' flat encoder mapping (196 entries), or their resume file's dict.
        encoder: the encoder to check names and shapes against (default: the ``authors`` preset's).

    Returns:
        (state dict for ``encoder.load_state_dict(..., strict=True)`` when the report is ok, report).
    """
    if encoder is None:
        from mambamim.models import create_model

        encoder = create_model(AUTHORS_MODEL["name"], **AUTHORS_MODEL["kwargs"]).encoder
    own = encoder.state_dict()
    report, out, placed = ConversionReport(), {}, set()
    for name, value in _unwrap_authors(state).items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. a nested config dict
        if name == "mae.mask_token":
            report.dropped[name] = "the Mamba stage's MAE mask token, used only in the authors' pre-training"
            continue
        if name == "mae.pos_embed":
            report.dropped[name] = _check_pos_embed(value, name)
            continue
        ours = authors_to_ours(name)
        if ours is None:
            report.unknown.append(name)
        elif ours not in own and _BACKWARD.fullmatch(name):
            report.dropped[name] = "backward-direction mixer tensor: created but never read by the one-directional mixer"
        elif ours not in own:
            report.unknown.append(name)
        elif tuple(value.shape) != tuple(own[ours].shape):
            report.mismatched.append((name, tuple(value.shape), tuple(own[ours].shape)))
            placed.add(ours)
        else:
            out[ours] = value.detach().to("cpu", torch.float32).clone()
            report.converted[name] = ours
    report.missing = [k for k in own if k not in out and k not in placed]
    return out, report


def _torch_load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on bad bytes
        raise ValueError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a dict")
    return dict(state)


def read_encoder_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encoder weights and the model they belong to ({"name", "kwargs"}) from ``encoder.pt``, a
    pre-training ``last.pt`` or a fine-tuning checkpoint; raises ValueError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "encoder.pt"
    ckpt = _torch_load(path)
    model = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), Mapping) else ckpt.get("model")
    if not (isinstance(model, Mapping) and "name" in model):
        raise ValueError(f"{path} names no model: not a mambamim checkpoint (for the authors' files use "
                         "`mambamim convert authors`)")  # fmt: skip
    for key in ("encoder", "pretrainer", "model"):
        weights = ckpt.get(key)
        if isinstance(weights, Mapping) and weights and all(isinstance(v, torch.Tensor) for v in weights.values()):
            if key != "encoder":
                weights = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
            return dict(weights), {"name": model["name"], "kwargs": dict(model.get("kwargs", {}))}
    raise ValueError(f"{path} holds no encoder weights")


def load_pretrained_encoder(path: str | os.PathLike) -> nn.Module:
    """The encoder of one of our encoder checkpoints, weights loaded strictly, in eval mode.

    Called on a dense batch x (B, C, D, H, W), it returns the feature maps the segmentation decoder consumes,
    finest first (for HyMamba: L0..L3 from the skip blocks, then the Mamba stage's 1/16 map).
    """
    from mambamim.models import create_model

    weights, model = read_encoder_state(path)
    kwargs = {k: v for k, v in model["kwargs"].items() if k != "num_classes"}
    encoder = create_model(model["name"], **kwargs).encoder
    result = encoder.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: encoder tensors missing {result.missing_keys[:8]}, unexpected "
                         f"{result.unexpected_keys[:8]} (a checkpoint from an older version?)")  # fmt: skip
    return encoder.eval()
