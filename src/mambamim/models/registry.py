"""The model registry: one :class:`ModelEntry` per network, read by every tool.

The CLI's ``--model`` / ``--size`` choices, configuration validation (:mod:`mambamim.engine.config`),
``mambamim info``, the pre-trainer (:func:`mambamim.pretrain.create_pretrainer`), fine-tuning
(:func:`create_model` / :func:`model_config`) and the parametrised model tests all read
:data:`REGISTRY`.

**Adding a model** means adding one :class:`ModelEntry` to :data:`REGISTRY` below: the segmentation
network and its encoder as ``"module:attribute"`` paths (imported when first built, so that this module
imports no torch and the CLI's ``--help`` stays instant), its size presets as data, whether it can be
pre-trained, its default crop and its patch size. The network must expose its encoder as ``.encoder``,
and every constructor argument of the network that is not its encoder's belongs to the head.

This module is torch-free on purpose (only the standard library).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

__all__ = [
    "PATCH_SIZE",
    "ModelEntry",
    "REGISTRY",
    "MODEL_PRESETS",
    "get_entry",
    "list_models",
    "list_sizes",
    "pretrainable_models",
    "model_config",
    "create_model",
    "create_encoder",
]

# Side in voxels of one bottleneck cell: the networks' total downsampling (HyMamba's four 2x poolings,
# Vim's 16^3 patch embedding), the masking grid (input / PATCH_SIZE) and the pre-training loss patch.
# Every crop and window side must be a multiple of it.
PATCH_SIZE = 16


def _frozen(presets: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({size: MappingProxyType(dict(kw)) for size, kw in presets.items()})


@dataclass(frozen=True)
class ModelEntry:
    """One registered network.

    Attributes:
        name: the name every tool uses (``--model``).
        network: ``"module:attribute"`` of the segmentation network's constructor (forward(x (B, C, D, H, W))
            -> logits (B, num_classes, D, H, W)); it holds its encoder as ``.encoder``.
        encoder: ``"module:attribute"`` of the encoder's constructor (what pre-training trains).
        presets: size name -> constructor keyword arguments ("base" = the paper's configuration).
        fixed: keyword arguments always passed to both constructors (they define this entry).
        pretrainable: whether :func:`mambamim.pretrain.create_pretrainer` accepts it.
        pretrain_token: the pre-trainer's default mask filling (``toki`` or ``learnable``).
        cnn_stages: the encoder has MedNeXt CNN stages that masking can make sparse (bottom-up masking and
            the pre-trainer's ``sparse_full_res`` apply).
        default_crop: training crop side in voxels.
        patch_size: bottleneck stride in voxels (input sides must be multiples of it).
        description: one line for ``mambamim info`` and the docs.
    """

    name: str
    network: str
    encoder: str
    presets: Mapping[str, Mapping[str, Any]]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    pretrainable: bool = True
    pretrain_token: str = "toki"
    cnn_stages: bool = True
    default_crop: int = 96
    patch_size: int = PATCH_SIZE
    description: str = ""

    def __post_init__(self) -> None:
        if "base" not in self.presets:
            raise ValueError(f"model {self.name!r}: the presets need a 'base' size")
        if self.default_crop % self.patch_size:
            raise ValueError(f"model {self.name!r}: default_crop {self.default_crop} is not a multiple of "
                             f"its patch size {self.patch_size}")  # fmt: skip
        object.__setattr__(self, "presets", _frozen(self.presets))
        object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(self.presets)

    def network_class(self) -> Callable[..., Any]:
        return _resolve(self.network)

    def encoder_class(self) -> Callable[..., Any]:
        return _resolve(self.encoder)

    def head_keys(self) -> frozenset[str]:
        """Named arguments of the network's constructor that its encoder does not take (num_classes, ...)."""
        encoder = inspect.signature(self.encoder_class()).parameters
        return frozenset(
            name for name, p in inspect.signature(self.network_class()).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in encoder
        )  # fmt: skip


def _resolve(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


# The authors' released HyMamba (../shared/authors/): channel LayerNorm in MedNeXt and skip blocks, plain
# widening convs, one-directional Mamba in raster order, no final norm, a 64->32 last stage.
AUTHORS: Mapping[str, Any] = MappingProxyType(dict(
    norm="layer", widen="conv", skip_norm="layer", skip_bias=True, final_norm=False, bidirectional=False,
    scan="raster", final_channels=32,
))  # fmt: skip

_CNN_TINY = dict(stem_channels=8, widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), expansions=(2, 2, 2, 2))
# the CPU demo's network: tiny's depths at twice its widths learn the demo's organs in a few hundred
# iterations where tiny learns two (docs/DEMO.md); about 1.4x tiny's step time
_CNN_MINI = dict(stem_channels=16, widths=(16, 32, 48, 96), depths=(1, 1, 1, 1), expansions=(2, 2, 2, 2))
_CNN_SMALL = dict(stem_channels=16, widths=(32, 64, 96, 192), depths=(1, 1, 2, 1))

_HYMAMBA = "mambamim.models.hymamba"
_VIM = "mambamim.models.vim_unetr"

# Size presets: "base" is the paper's configuration, "tiny" is for tests, "mini" for the CPU demo.
_ENTRIES = (
    ModelEntry(
        "hymamba", f"{_HYMAMBA}:HyMamba", f"{_HYMAMBA}:HyMambaEncoder",
        presets={
            "base": {},
            "tiny": {**_CNN_TINY, "mamba_depth": 1},
            "mini": {**_CNN_MINI, "mamba_depth": 2},
            "small": {**_CNN_SMALL, "mamba_depth": 2},
            "authors": AUTHORS,
        },
        description="MedNeXt CNN stages + Vision-Mamba at 1/16, UNETR decoder (the paper's network)",
    ),
    ModelEntry(
        "vim_unetr", f"{_VIM}:VimUNETR", f"{_VIM}:VimEncoder",
        presets={
            "base": {},
            "tiny": dict(dim=48, depth=4, feature_size=8),
            "mini": dict(dim=96, depth=4, feature_size=16),
            "small": dict(dim=384, depth=12, feature_size=16),
        },
        cnn_stages=False,
        description="UNETR with a Vision-Mamba encoder on 16^3 patches (the paper's vanilla Mamba)",
    ),
    ModelEntry(
        # HyMamba's CNN stages without the Mamba part: the pure-CNN (SparK) case.
        "mednext_cnn", f"{_HYMAMBA}:HyMamba", f"{_HYMAMBA}:HyMambaEncoder",
        presets={"base": {}, "tiny": _CNN_TINY, "mini": _CNN_MINI, "small": _CNN_SMALL},
        fixed={"mamba_depth": 0},
        pretrain_token="learnable",
        description="HyMamba's MedNeXt CNN without Mamba (SparK's pure-CNN setting)",
    ),
)  # fmt: skip

REGISTRY: Mapping[str, ModelEntry] = MappingProxyType({entry.name: entry for entry in _ENTRIES})
# size presets per model, as data (a read-only view of the registry)
MODEL_PRESETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = MappingProxyType(
    {name: entry.presets for name, entry in REGISTRY.items()}
)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(REGISTRY)


def pretrainable_models() -> list[str]:
    """Names of the models MambaMIM can pre-train, sorted."""
    return sorted(name for name, entry in REGISTRY.items() if entry.pretrainable)


def list_sizes(name: str | None = None) -> list[str]:
    """The size presets of ``name``, or of any model (None), in registry order."""
    entries = REGISTRY.values() if name is None else (get_entry(name),)
    sizes: list[str] = []
    for entry in entries:
        sizes += [s for s in entry.sizes if s not in sizes]
    return sizes


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ValueError listing the known models otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return REGISTRY[name]


def model_config(name: str, size: str = "base", **kwargs: Any) -> dict[str, Any]:
    """The full keyword arguments ``create_model`` would pass for ``name`` / ``size`` / overrides
    (the preset, then the overrides; the entry's ``fixed`` arguments are added at construction)."""
    entry = get_entry(name)
    if size not in entry.presets:
        raise ValueError(f"unknown size {size!r} for {name!r}; available: {sorted(entry.presets)}")
    return {**entry.presets[size], **kwargs}


def create_model(name: str, size: str = "base", **kwargs: Any) -> Any:
    """Build a segmentation network by name (see :func:`list_models`).

    Args:
        name: registered model name.
        size: preset (``base`` = paper configuration, ``small``, ``mini``, ``tiny``, ...).
        **kwargs: constructor arguments overriding the preset (in_channels, num_classes, scan, widths, ...).

    Returns:
        an ``nn.Module``: forward(x (B, C_in, D, H, W)) -> logits (B, num_classes, D, H, W), sides multiples
        of :data:`PATCH_SIZE`.
    """
    entry = get_entry(name)
    return entry.network_class()(**{**model_config(name, size, **kwargs), **entry.fixed})


def create_encoder(name: str, size: str = "base", **kwargs: Any) -> Any:
    """Build the encoder of ``name`` alone: the preset and overrides without the network's head arguments
    (num_classes, decoder norms, ...). Its ``state_dict`` keys are those of ``create_model(name).encoder``."""
    entry = get_entry(name)
    head = entry.head_keys()
    config = {k: v for k, v in model_config(name, size, **kwargs).items() if k not in head}
    return entry.encoder_class()(**{**config, **entry.fixed})
