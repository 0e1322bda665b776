"""Checkpoints: atomic writes, clear load errors, RNG capture, encoder transfer.

Checkpoints are plain dicts of tensors and plain Python containers so that they load with
``torch.load(weights_only=True)`` (no arbitrary unpickling of files users download).

Formats written by the engine (``"format"`` key):

- ``mambamim-pretrain``: full pre-training state (``pretrainer``, optimiser, scheduler, scaler,
  RNG, data position, config, ``pretrainer_spec``).
- ``mambamim-encoder``: ``encoder.pt`` of a pre-training run: ``encoder`` (state_dict),
  ``model`` ({"name", "kwargs"}), ``config``, ``pretrainer_spec``, ``step``.

``pretrainer_spec`` is ``PretrainConfig.pretrainer_spec()`` ({"name", "kwargs"} of
``create_pretrainer``): :func:`mambamim.engine.inference.load_pretrainer` and
:func:`~mambamim.engine.inference.load_pretrained_encoder` rebuild from it (older checkpoints
without it: from their ``config``).
- ``mambamim-finetune``: ``model`` (state_dict of the segmentation network), ``model_config``
  ({"name", "kwargs"}), ``labels`` ({"0": "background", ...}), ``preprocessing`` (the cache's
  preprocessing parameters), plus training state in ``last.pt``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mambamim.atomic import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "EncoderMismatchError",
    "EncoderLoadReport",
    "save_checkpoint",
    "load_checkpoint",
    "load_resume_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "numpy_state_to_dict",
    "numpy_state_from_dict",
    "extract_encoder_state",
    "load_encoder_weights",
    "read_pretrained_weights",
    "model_from_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of an unexpected kind."""


class EncoderMismatchError(ValueError):
    """Pre-trained encoder weights do not match the model's encoder (see the message's report)."""


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` with ``torch.save`` atomically.

    The data go to a temporary file in the same folder, which is flushed and fsynced, then
    renamed over ``path`` (``os.replace``) and the folder is fsynced. A crash at any point leaves
    either the previous file or the new one, never a partial file at ``path``.

    Args:
        path: destination file; parent folders are created.
        state: a dict of tensors and plain containers.

    Returns:
        The destination path.
    """
    path = Path(path)
    with atomic_write(path) as handle:
        torch.save(dict(state), handle)
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu", *, trusted: bool = False
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any ``torch.save`` dict).

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.
        trusted: allow full unpickling (only for files you trust); by default only tensors and
            plain containers are loaded (``weights_only=True``).

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        CheckpointError: the file is empty, truncated, corrupt, needs unpickling of arbitrary
            objects while ``trusted`` is False, or does not hold a dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or an interrupted copy")
    try:
        state = torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain containers; "
                "it was not written by mambamim. Load it with trusted=True only if you trust its source."
            ) from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc})") from exc
    except Exception as exc:  # torch.load raises many kinds (RuntimeError, EOFError, IndexError...) on bad bytes
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def _epoch_number(path: Path) -> int:
    match = re.fullmatch(r"epoch_(\d+)\.pt", path.name)
    return int(match[1]) if match else -1


def load_resume_checkpoint(
    run: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint a run resumes from: ``RUN/checkpoints/last.pt``, or, when it is missing or
    unreadable (truncated, corrupt), the newest readable ``RUN/checkpoints/epoch_NNNN.pt`` with a
    warning that names both files (the steps after it are trained again).

    Returns:
        (the file used, its loaded dict).

    Raises:
        CheckpointError: no readable checkpoint; the one-line message names the run folder and what
            was wrong with each candidate.
    """
    run = Path(run)
    folder = run / "checkpoints"
    last = folder / "last.pt"
    if last.exists():
        try:
            return last, load_checkpoint(last, map_location=map_location)
        except CheckpointError as exc:
            problem = f"{last} is unreadable ({_one_line(exc)})"
    else:
        problem = f"{last} is missing (deleted?)"
    epochs = sorted((p for p in folder.glob("epoch_*.pt") if _epoch_number(p) >= 0), key=_epoch_number, reverse=True)
    bad: list[str] = []
    for path in epochs:
        try:
            state = load_checkpoint(path, map_location=map_location)
        except CheckpointError as exc:
            logger.warning("skipping unreadable epoch checkpoint %s (%s)", path, _one_line(exc))
            bad.append(path.name)
            continue
        logger.warning("%s: resuming from %s (step %s), the newest valid epoch checkpoint; the steps after it "
                       "are trained again", problem, path, state.get("step"))
        return path, state
    others = f"the epoch checkpoints {', '.join(bad)} are unreadable too" if bad else "and there is no epoch checkpoint"
    raise CheckpointError(f"cannot resume {run}: no valid checkpoint ({problem}, {others}); "
                          f"start a new run with --overwrite")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------------------- RNG


def numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    """A ``numpy.random.RandomState.get_state()`` tuple as a ``weights_only``-loadable dict."""
    return {
        "kind": str(state[0]),
        "keys": torch.from_numpy(np.asarray(state[1], dtype=np.int64)),
        "pos": int(state[2]),
        "has_gauss": int(state[3]),
        "cached_gaussian": float(state[4]),
    }


def numpy_state_from_dict(state: Mapping[str, Any]) -> tuple:
    """Inverse of :func:`numpy_state_to_dict`."""
    return (state["kind"], state["keys"].cpu().numpy().astype(np.uint32), state["pos"], state["has_gauss"],
            state["cached_gaussian"])


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the Python, NumPy, torch CPU and (if present) CUDA random generators.

    Returns a dict that loads with ``weights_only=True`` (NumPy's key array is kept as a tensor).
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy_state_to_dict(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state` (CUDA only when both sides have it)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(numpy_state_from_dict(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine has %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


# ------------------------------------------------------------------------------ encoder transfer


@dataclass
class EncoderLoadReport:
    """What happened when pre-trained weights were loaded into ``model.encoder``.

    Attributes:
        loaded: keys copied into the encoder.
        missing: encoder keys with no weight in the checkpoint (left at their initial values).
        unexpected: checkpoint keys the encoder does not have (not loaded).
        mismatched: (key, checkpoint shape, encoder shape) for same-named tensors of different shape.
        ignored: checkpoint keys outside the encoder (e.g. the pre-training decoder), never loaded.
        source: where the weights came from (for messages).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source: str = ""
    loaded_numel: int = 0
    total_numel: int = 0

    @property
    def total(self) -> int:
        return len(self.loaded) + len(self.missing) + len(self.mismatched)

    def not_loaded_groups(self) -> list[str]:
        """Module groups of the encoder with at least one tensor not loaded (e.g. ``skip_blocks.3``)."""
        keys = self.missing + [k for k, _, _ in self.mismatched]
        return sorted({_group_of(k) for k in keys})

    def headline(self) -> str:
        """``loaded N of M encoder tensors (X M of Y M parameters)``, plus the groups left out."""
        text = (f"loaded {len(self.loaded)} of {self.total} encoder tensors ({self.loaded_numel / 1e6:.2f} M of "
                f"{self.total_numel / 1e6:.2f} M parameters)")
        groups = self.not_loaded_groups()
        return text + (f"; not loaded: {', '.join(groups)}" if groups else "")

    @property
    def ok(self) -> bool:
        """True when every encoder tensor was loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, max_keys: int = 20) -> str:
        """A multi-line human-readable report (lists are cut after ``max_keys`` entries)."""

        def listing(title: str, items: list[str]) -> list[str]:
            if not items:
                return []
            lines = [f"  {title} ({len(items)}):"]
            lines += [f"    {k}" for k in items[:max_keys]]
            if len(items) > max_keys:
                lines.append(f"    ... and {len(items) - max_keys} more")
            return lines

        head = f"encoder weights{' from ' + self.source if self.source else ''}: {self.headline()}"
        lines = [head]
        lines += listing("missing in checkpoint", self.missing)
        lines += listing("unexpected in checkpoint", self.unexpected)
        lines += listing(
            "shape mismatch (checkpoint vs model)",
            [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched],
        )
        if self.ignored:
            lines.append(f"  ignored non-encoder tensors: {len(self.ignored)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.headline(),
            "loaded": len(self.loaded),
            "total": self.total,
            "loaded_parameters": self.loaded_numel,
            "total_parameters": self.total_numel,
            "not_loaded_groups": self.not_loaded_groups(),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched],
            "ignored": len(self.ignored),
            "source": self.source,
        }


def _group_of(key: str) -> str:
    """The module group a tensor belongs to: ``skip_blocks.3.conv1.weight`` -> ``skip_blocks.3``,
    ``mamba.layers.1.mixer.A_log`` -> ``mamba.layers.1``, ``stem.weight`` -> ``stem``."""
    parts = key.split(".")[:-1]
    depth = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), len(parts))
    return ".".join(parts[:depth]) or key


def strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """``state`` without ``prefix`` on its keys when every key has it (DDP's ``module.``), else a copy."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def extract_encoder_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pick the encoder's tensors out of a state dict.

    Accepts an encoder state dict, a pre-trainer's or a segmentation model's state dict (keys
    ``encoder.*`` are taken, the prefix removed; the rest is returned as ignored), each possibly
    with DDP's ``module.`` prefix.

    Returns:
        (encoder state dict, ignored keys).
    """
    state = strip_prefix(state_dict, "module.")
    if any(k.startswith("encoder.") for k in state):
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        ignored = [k for k in state if not k.startswith("encoder.")]
        return enc, ignored
    return dict(state), []


def load_encoder_weights(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    strict: bool = True,
    *,
    allow_partial: bool = False,
    source: str = "",
) -> EncoderLoadReport:
    """Load pre-trained encoder weights into ``model.encoder`` by name.

    Args:
        model: a segmentation network with an ``encoder`` attribute (or the encoder itself when it
            has no such attribute).
        state_dict: encoder weights; see :func:`extract_encoder_state` for accepted layouts.
        strict: refuse missing or unexpected keys. Shape mismatches are always refused unless
            ``allow_partial``.
        allow_partial: load the tensors that match by name and shape, skip the rest; everything
            skipped is in the report (and logged), never silently dropped.
        source: a description of where the weights come from, for the report.

    Returns:
        The :class:`EncoderLoadReport`.

    Raises:
        EncoderMismatchError: on any mismatch that is not allowed; the message holds the report
            and the model is left untouched.
    """
    encoder = getattr(model, "encoder", model)
    weights, ignored = extract_encoder_state(state_dict)
    own = encoder.state_dict()
    report = EncoderLoadReport(ignored=ignored, source=source)
    to_load: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key not in weights:
            report.missing.append(key)
            continue
        value = weights[key]
        if not isinstance(value, torch.Tensor):
            report.unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(target.shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target.shape)))
            continue
        to_load[key] = value
    report.unexpected += [k for k in weights if k not in own]
    report.loaded = sorted(to_load)
    report.loaded_numel = sum(v.numel() for v in to_load.values())
    report.total_numel = sum(v.numel() for v in own.values())
    refuse = bool(report.mismatched) or (strict and bool(report.missing or report.unexpected))
    if refuse and not allow_partial:
        raise EncoderMismatchError(
            "pre-trained encoder does not match the model: " + report.headline() + " (pass allow_partial=True / "
            "--allow-partial to load the matching tensors only; an encoder.pt from before version 0.5 lacks the "
            "skip blocks, which are now part of the encoder):\n" + report.summary()
        )
    if not to_load:
        raise EncoderMismatchError("no pre-trained tensor matches the model's encoder:\n" + report.summary())
    missing_ok = set(own) - set(to_load)
    result = encoder.load_state_dict(to_load, strict=False)
    if set(result.missing_keys) != missing_ok or result.unexpected_keys:  # pragma: no cover - defensive
        raise RuntimeError("internal error: encoder load did not match the report")
    (logger.info if report.ok else logger.warning)("%s", report.summary())
    return report


def read_pretrained_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(For the encoder itself as a module, see :func:`mambamim.models.load_pretrained_encoder`.) Read encoder
    weights from ``encoder.pt``, a pre-training or a fine-tuning checkpoint, or a
    pre-training run folder.

    Returns:
        (state dict (may still carry ``encoder.`` prefixes; pass it to :func:`load_encoder_weights`),
        metadata: {"format", "model" ({"name", "kwargs"}) when known, "path"}).
    """
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "encoder.pt", path / "checkpoints" / "last.pt", path / "checkpoints" / "best.pt"):
            if candidate.exists():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"no encoder.pt or checkpoints/last.pt in run folder {path}")
    ckpt = load_checkpoint(path)
    fmt = ckpt.get("format", "")
    meta: dict[str, Any] = {"format": fmt, "path": str(path)}
    if "model_config" in ckpt:
        meta["model"] = ckpt["model_config"]
    elif isinstance(ckpt.get("model"), dict) and "name" in ckpt["model"] and "kwargs" in ckpt["model"]:
        meta["model"] = ckpt["model"]
    for key in ("encoder", "pretrainer", "model", "state_dict"):
        value = ckpt.get(key)
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            return value, meta
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, meta  # a bare state dict
    raise CheckpointError(f"{path} holds no encoder weights (keys: {sorted(ckpt)[:10]})")


_LEGACY_SKIP = re.compile(r"skip_blocks\.(\d+)\.layer\.(conv1|conv2)\.conv\.weight")


def migrate_legacy_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """A fine-tuned HyMamba from before the skip blocks joined the encoder (MONAI ``UnetrBasicBlock`` at
    ``skip_blocks.i``) renamed onto ``encoder.skip_blocks.i`` (same weights: bias-free convs, a non-affine
    instance norm); other state dicts come back unchanged."""
    out = {}
    for key, value in state.items():
        match = _LEGACY_SKIP.fullmatch(key)
        out[f"encoder.skip_blocks.{match[1]}.{match[2]}.weight" if match else key] = value
    return out


def model_from_checkpoint(
    ckpt: str | os.PathLike | Mapping[str, Any], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned segmentation network from its checkpoint.

    Args:
        ckpt: a fine-tuning checkpoint (``best.pt`` / ``last.pt``), its loaded dict, or a
            fine-tuning run folder (``checkpoints/best.pt`` is preferred, then ``last.pt``).
        map_location: where tensors are loaded.

    Returns:
        (model in eval mode with the weights loaded, info) where info holds ``model_name``,
        ``model_kwargs``, ``num_classes``, ``in_channels``, ``labels`` ({"0": "background", ...}),
        ``class_names`` (list indexed by class), ``preprocessing`` (dict for
        ``PreprocessParams.from_dict``, may be None), ``roi_size``, ``step``, ``best_metric``
        and ``path`` (when read from a file).
    """
    path: Path | None = None
    if not isinstance(ckpt, Mapping):
        path = Path(ckpt)
        if path.is_dir():
            for candidate in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / "best.pt"):
                if candidate.exists():
                    path = candidate
                    break
            else:
                raise FileNotFoundError(f"no checkpoints/best.pt or checkpoints/last.pt in {path}")
        ckpt = load_checkpoint(path, map_location=map_location)
    model_config = ckpt.get("model_config")
    if not isinstance(model_config, Mapping) or "name" not in model_config:
        where = f" {path}" if path else ""
        raise CheckpointError(
            f"checkpoint{where} has no model configuration: not a mambamim fine-tuning checkpoint "
            f"(format={ckpt.get('format')!r})"
        )
    from mambamim.models import create_model

    kwargs = dict(model_config.get("kwargs", {}))
    model = create_model(model_config["name"], **kwargs)
    state = migrate_legacy_keys(strip_prefix(ckpt["model"], "module."))
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    labels = ckpt.get("labels")
    num_classes = int(kwargs.get("num_classes", 0)) or (len(labels) if labels else 0)
    class_names = [str(labels.get(str(i), f"class_{i}")) for i in range(num_classes)] if labels else [
        f"class_{i}" for i in range(num_classes)
    ]
    info = {
        "model_name": model_config["name"],
        "model_kwargs": kwargs,
        "num_classes": num_classes,
        "in_channels": int(kwargs.get("in_channels", 1)),
        "labels": dict(labels) if labels else None,
        "class_names": class_names,
        "preprocessing": ckpt.get("preprocessing"),
        "roi_size": ckpt.get("roi_size"),
        "step": ckpt.get("step"),
        "best_metric": ckpt.get("best_metric"),
        "path": str(path) if path else None,
    }
    return model, info
