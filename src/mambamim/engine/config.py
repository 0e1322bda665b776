"""Typed, validated run configurations (saved as ``config.yaml`` in the run folder) and the
resolution of a ``--data`` argument to a preprocessed cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from mambamim.atomic import write_text_atomic
from mambamim.data.cache import CACHE_FORMAT
from mambamim.models.registry import PATCH_SIZE, get_entry, list_sizes, pretrainable_models

logger = logging.getLogger(__name__)

__all__ = [
    "PretrainConfig",
    "FinetuneConfig",
    "SIZES",
    "CACHE_FORMAT",
    "find_cache",
    "resolve_data",
    "read_cache_meta",
    "model_size_kwargs",
    "resolve_sparse_full_res",
    "resolve_sparse_levels",
    "PATCH_SIZE",
]

# every size of the model registry ("authors": the authors' released HyMamba, exactly)
SIZES = tuple(list_sizes())
TOKENS = ("toki", "learnable")
SCANS = ("raster", "zigzag", "hilbert", "shuffle")
AMP_MODES = ("auto", "bf16", "fp16", "none")

C = TypeVar("C", bound="_Config")


@dataclass
class _Config:
    KIND: ClassVar[str] = ""
    # Options that may differ when a run is resumed (they do not change the maths).
    RESUME_OVERRIDABLE: ClassVar[tuple[str, ...]] = ("device", "workers", "stop_after", "progress", "resume",
                                                     "memory_budget", "overwrite")

    # Options shared by pre-training and fine-tuning (subclasses add their own and may change defaults).
    data: str = ""
    out: str = ""
    model: str = "hymamba"
    size: str = "base"
    scan: str = "raster"
    batch_size: int = 8
    num_crops: int = 4
    crop: int = 96
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    clip_grad: float | None = 1.0
    amp: str = "auto"
    compile: bool = False
    memory_budget: float = 1.0
    device: str = "auto"
    seed: int = 0
    workers: int = 4
    checkpoint_steps: int = 0
    log_every: int = 10
    stop_after: int | None = None
    find_unused_parameters: str = "auto"
    progress: bool = True
    resume: str | None = None
    # A new run refuses an ``out`` that already holds a run (config.yaml, metrics.csv, checkpoints, encoder.pt)
    # unless this is set: then the earlier run's files are moved into ``out/.overwritten-<timestamp>/``.
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML / JSON serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build from a dict; unknown keys raise ValueError (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"kind"})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in values.items() if k in names})
        cfg.validate()
        return cfg

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "out", "resume", "pretrained", "val_cases")

    def resolved(self: C, device: str | None = None) -> C:
        """A copy to record in ``config.yaml``: file options as absolute paths and, when given, the device
        the run really uses (``auto`` resolved), so the run can be repeated from that file alone."""
        values = {}
        for name in self.PATH_FIELDS:
            value = getattr(self, name, None)
            if value:
                values[name] = str(Path(value).expanduser().absolute())
        if device is not None:
            values["device"] = str(device)
        return dataclasses.replace(self, **values)

    def save_yaml(self, path: str | os.PathLike) -> Path:
        """Write the configuration (with a ``kind`` line) to ``path``."""
        data = {"kind": self.KIND, **self.to_dict()}
        return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load_yaml(cls: type[C], path: str | os.PathLike) -> C:
        """Read a configuration written by :meth:`save_yaml`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a configuration of this kind, or invalid values.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"run configuration not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a run configuration")
        kind = data.pop("kind", cls.KIND)
        if kind != cls.KIND:
            raise ValueError(f"{path} is a {kind!r} configuration, expected {cls.KIND!r}")
        return cls.from_dict(data)

    def validate(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    # shared checks
    def _check_model(self) -> None:
        """The model and size against the model registry (ValueErrors list the known ones)."""
        entry = get_entry(self.model)
        if self.size not in entry.presets:
            raise ValueError(f"model {self.model!r} has no size {self.size!r}; its sizes: {', '.join(entry.sizes)}")
        for name in ("crop",) + (("roi",) if getattr(self, "roi", None) is not None else ()):
            side = getattr(self, name)
            if side < entry.patch_size or side % entry.patch_size:
                raise ValueError(f"{name} must be a positive multiple of {entry.patch_size} (the patch size of "
                                 f"{self.model}), got {side}")  # fmt: skip

    def _check_common(self) -> None:
        self._check_model()
        if not self.data and not self.resume:
            raise ValueError("data is required (a cache folder, a dataset.json or a folder of NIfTI / DICOM)")
        if not self.out and not self.resume:
            raise ValueError("out (the run folder) is required")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other (resume continues the run, overwrite starts over)")
        if self.scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {self.scan!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {self.num_crops}")
        if self.batch_size % self.num_crops:
            raise ValueError(
                f"batch_size counts crops per step and must be a multiple of num_crops "
                f"(crops per volume): got batch_size={self.batch_size}, num_crops={self.num_crops}"
            )
        if not 0 < self.memory_budget <= 1:
            raise ValueError(f"memory_budget must be in (0, 1], got {self.memory_budget}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0 or None disables), got {self.clip_grad}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.checkpoint_steps < 0:
            raise ValueError(f"checkpoint_steps must be >= 0, got {self.checkpoint_steps}")
        if str(self.find_unused_parameters).lower() not in ("auto", "true", "false"):
            raise ValueError(f"find_unused_parameters must be auto, true or false, got {self.find_unused_parameters!r}")


@dataclass
class PretrainConfig(_Config):
    """Every option of a MambaMIM pre-training run (paper section 4.2 defaults).

    ``decoder_width`` (None: the pre-trainer's default for the size, 768 for base) sets the light
    decoder's width at the bottleneck. ``compile``: torch.compile the training forward (and, on CUDA,
    run channels-last 3D), the fastest setting measured in benchmarks/RESULTS.md. ``memory_budget`` (with
    ``compile``, below 1): the compiled step keeps at most about that fraction of the activations it would
    save for the backward pass and recomputes cheap elementwise ops there instead (PyTorch's
    ``activation_memory_budget``). ``cuda_graphs`` (with ``compile``, one CUDA device): replay the
    compiled forward and backward as CUDA graphs (torch.compile's "reduce-overhead"), which removes the
    kernel-launch gaps. ``sparse_full_res`` computes the stem, the full-resolution encoder layer and the
    decoder's skip projection from the visible cells only (same result, less work and memory); None
    (the default) turns it on wherever it applies (HyMamba or the CNN under bottom-up masking).
    ``sparse_levels`` (1-3) is how many encoder levels it covers; None (the default) means 2 with
    ``cuda_graphs`` and 1 without, the faster of each on an H100 (benchmarks/RESULTS.md).
    ``batch_size`` counts crops per optimiser step (per process): ``batch_size / num_crops``
    volumes, ``num_crops`` random crops each.
    Length: ``steps`` optimiser steps when given, else ``epochs`` passes over the data.
    ``save_every`` is in epochs (periodic ``checkpoints/epoch_NNNN.pt``); ``last.pt`` and
    ``encoder.pt`` are rewritten at every epoch end, every ``checkpoint_steps`` steps (0 = only at
    epoch ends) and when the run stops. ``stop_after`` ends this session after that many steps
    (with a checkpoint) without changing the schedule, for time-limited jobs; ``--resume``
    continues it.
    """

    KIND: ClassVar[str] = "pretrain"
    RESUME_OVERRIDABLE: ClassVar[tuple[str, ...]] = _Config.RESUME_OVERRIDABLE + ("cuda_graphs", "sparse_levels")

    in_channels: int = 1
    mask_ratio: float = 0.75
    token: str = "toki"
    skip: bool = True
    bottom_up: bool = True
    decoder_width: int | None = None
    sparse_full_res: bool | None = None
    sparse_levels: int | None = None
    cuda_graphs: bool = False
    epochs: int | None = 100
    steps: int | None = None
    save_every: int = 10
    vis_every: int = 5
    cases: list[str] | None = None

    def _check_model(self) -> None:
        super()._check_model()
        if not get_entry(self.model).pretrainable:
            raise ValueError(f"model {self.model!r} cannot be pre-trained; pre-trainable models: "
                             f"{', '.join(pretrainable_models())}")  # fmt: skip

    def validate(self) -> None:
        """Raise ValueError on an invalid option."""
        self._check_common()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.token not in TOKENS:
            raise ValueError(f"token must be one of {TOKENS}, got {self.token!r}")
        if self.steps is None and (self.epochs is None or self.epochs < 1):
            raise ValueError("give epochs >= 1 or steps >= 1")
        if self.decoder_width is not None and self.decoder_width < 8:
            raise ValueError(f"decoder_width must be >= 8 (or None for the default), got {self.decoder_width}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile (it replays the compiled step as CUDA graphs)")
        if self.sparse_full_res and not (get_entry(self.model).cnn_stages and self.bottom_up):
            raise ValueError("sparse_full_res needs a CNN stage under bottom-up masking (hymamba or mednext_cnn "
                             "with bottom_up)")  # fmt: skip
        if self.sparse_levels is not None and (isinstance(self.sparse_levels, bool) or self.sparse_levels not in (1, 2, 3)):
            raise ValueError(f"sparse_levels must be 1, 2 or 3 (or None: 2 with cuda_graphs, else 1), got {self.sparse_levels!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.save_every < 0 or self.vis_every < 0:
            raise ValueError("save_every and vis_every must be >= 0 (0 disables)")

    def pretrainer_spec(self) -> dict[str, Any]:
        """``{"name", "kwargs"}``: the complete, explicit arguments of the run's pre-trainer, so that
        ``mambamim.pretrain.create_pretrainer(spec["name"], **spec["kwargs"])`` builds it, here and when a
        checkpoint is read back (pre-training checkpoints and ``encoder.pt`` save it as ``pretrainer_spec``).
        The sparse options are resolved (:func:`resolve_sparse_full_res`, :func:`resolve_sparse_levels`);
        ``decoder_width`` is given when set (else the pre-trainer's default for the size)."""
        kwargs: dict[str, Any] = dict(
            in_channels=int(self.in_channels), mask_ratio=float(self.mask_ratio), token=self.token, skip=bool(self.skip),
            bottom_up=bool(self.bottom_up), scan=self.scan, sparse_full_res=resolve_sparse_full_res(self),
            sparse_levels=resolve_sparse_levels(self), **model_size_kwargs(self.size),
        )  # fmt: skip
        if self.decoder_width is not None:
            kwargs["decoder_width"] = int(self.decoder_width)
        return {"name": self.model, "kwargs": kwargs}


@dataclass
class FinetuneConfig(_Config):
    """Every option of a fine-tuning run (Swin UNETR recipe defaults).

    ``batch_size`` counts crops per optimiser step (per process), as in pre-training.
    Validation cases: ``val_cases`` (a text file with one id a line, or a JSON list), else fold
    ``fold`` of ``num_folds`` when ``fold`` is given, else the cache's ``validation`` list or cases
    whose split is "val", else fold 0. ``fold=-1`` trains on every case without validation.
    ``checkpoint_steps`` (0 = ``val_every``) sets how often ``last.pt`` is rewritten.
    """

    KIND: ClassVar[str] = "finetune"

    weight_decay: float = 1e-5
    pretrained: str | None = None
    allow_partial: bool = False
    iterations: int = 50_000
    val_every: int = 500
    fold: int | None = None
    num_folds: int = 5
    val_cases: str | None = None
    roi: int | None = None
    overlap: float = 0.5
    sw_batch_size: int = 4
    augment: bool = True

    def validate(self) -> None:
        """Raise ValueError on an invalid option."""
        self._check_common()
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0 (0 disables validation), got {self.val_every}")
        if self.num_folds < 2:
            raise ValueError(f"num_folds must be >= 2, got {self.num_folds}")
        if self.fold is not None and not -1 <= self.fold < self.num_folds:
            raise ValueError(f"fold must be in [0, {self.num_folds}) (or -1: no validation), got {self.fold}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")

    @property
    def roi_size(self) -> int:
        return self.roi or self.crop


def resolve_sparse_full_res(config: Any) -> bool:
    """``config.sparse_full_res``, with None meaning: on wherever it applies (a CNN stage under bottom-up
    masking, per the model registry)."""
    if config.sparse_full_res is not None:
        return bool(config.sparse_full_res)
    return get_entry(config.model).cnn_stages and bool(config.bottom_up)


def resolve_sparse_levels(config: Any) -> int:
    """``config.sparse_levels``, with None meaning 2 under CUDA graphs and 1 otherwise: on an H100 the
    half-resolution cells saved time only once kernel launches no longer cost host time."""
    if config.sparse_levels is not None:
        return int(config.sparse_levels)
    return 2 if config.cuda_graphs else 1


def model_size_kwargs(size: str) -> dict[str, Any]:
    """Keyword arguments that select a network size preset in ``create_model`` /
    ``create_pretrainer`` ("base" is the paper's reference configuration)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {"size": size}


# ------------------------------------------------------------------------------------- data


def read_cache_meta(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The cache's ``dataset.json`` as a dict.

    Raises:
        DataError (a ValueError): no dataset.json, or not a mambamim cache.
    """
    from mambamim.data.cache import load_cache_index

    return load_cache_index(cache_dir)


def find_cache(data: str | os.PathLike) -> Path | None:
    """The cache folder ``data`` points at (the folder or its dataset.json), or None if ``data``
    is raw data that must be prepared first."""
    path = Path(data)
    candidate = path.parent if path.is_file() and path.name == "dataset.json" else path
    meta_path = candidate / "dataset.json"
    if candidate.is_dir() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT:
            return candidate
    return None


def resolve_data(
    data: str | os.PathLike, run_dir: str | os.PathLike, *, workers: int = 4, progress: bool = True, is_main: bool = True
) -> Path:
    """A preprocessed cache for ``data``: ``data`` itself when it is a cache (or its dataset.json),
    else ``RUN/cache`` prepared with default preprocessing (reused when already there, e.g. on
    resume). Only the main process prepares; callers synchronise afterwards.

    Raises:
        FileNotFoundError: ``data`` does not exist.
    """
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    cache = find_cache(path)
    if cache is not None:
        return cache
    out = Path(run_dir) / "cache"
    if find_cache(out) is not None:
        logger.info("reusing prepared cache %s", out)
        return out
    if is_main:
        from mambamim.data.prepare import prepare_dataset
        from mambamim.data.preprocess import PreprocessParams

        logger.info("preparing %s into %s (default preprocessing)", path, out)
        prepare_dataset(path, out, PreprocessParams(), workers=max(1, workers), strict=False, progress=progress)
    return out
