"""Sliding-window inference with optional flip test-time augmentation.

:func:`predict_volume` runs a segmentation network over a whole preprocessed volume with
:func:`monai.inferers.sliding_window_inference` (Gaussian blending of overlapping windows),
under bf16 autocast on CUDA, and optionally averages the softmax over flipped copies of the
input (each flipped back before averaging). The fine-tuning validation runs it too, so best.pt is
chosen under the inference that ``predict`` and ``evaluate`` give.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any, Literal, Sequence, TypedDict

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from mambamim.runtime.compiling import CompiledOrEager
from mambamim.runtime.device import autocast_context, cudnn_benchmark, resolve_amp, run_device

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

__all__ = ["TTAMode", "flip_sets", "CompiledSegmenter", "compile_segmenter", "inference_amp", "predict_volume",
           "roi_from_info", "centre_crop", "WindowOptions", "predict_labels"]

TTAMode = Literal["none", "axes", "all"]


def flip_sets(tta: bool | str) -> list[tuple[int, ...]]:
    """Spatial axes (of a (B, C, X, Y, Z) tensor) to flip for each TTA pass, identity first.

    ``False`` / ``"none"``: identity only. ``"axes"``: identity + the 3 single-axis flips (4 passes).
    ``True`` / ``"all"``: identity + all 7 non-empty flip combinations (8 passes).
    """
    if tta is False or tta == "none" or tta is None:
        return [()]
    if tta == "axes":
        return [(), (2,), (3,), (4,)]
    if tta is True or tta == "all":
        return [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)]
    raise ValueError(f"tta must be False/'none', 'axes' or True/'all', got {tta!r}")


class CompiledSegmenter(nn.Module):
    """A segmentation network wrapped for fast inference: torch.compile (built at the first call, about a
    minute for the base HyMamba on an H100; falls back to eager with a warning if compiling fails) and,
    on CUDA, channels-last 3D weights and windows. Same outputs as the wrapped network up to kernel
    rounding. Sliding-window inference of a 256x256x160 volume, bf16, 8 windows per pass: 0.49 s
    compiled against 1.07 s eager on an H100 (``benchmarks/RESULTS.md``).

    Pass it wherever the network goes (:func:`predict_volume`, :func:`segment_image`, evaluation); the
    network itself stays reachable as ``.model`` (save that, not the wrapper).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._run: CompiledOrEager | None = None  # a plain object: the compiled module is not a submodule

    def forward(self, x: torch.Tensor):
        if x.is_cuda:
            if self._run is None:
                self.model.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self._run is None:
            self._run = CompiledOrEager(self.model, what="inference")
        return self._run(x)


def compile_segmenter(model: nn.Module) -> CompiledSegmenter:
    """``model`` wrapped in :class:`CompiledSegmenter` (a no-op if it already is)."""
    return model if isinstance(model, CompiledSegmenter) else CompiledSegmenter(model)


def _logits(out) -> torch.Tensor:
    # deep-supervision models may return several outputs: the first is the full-resolution one
    if isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, dict):
        out = out["logits"]
    return out


def inference_amp(device: torch.device, amp: bool | str = True) -> str:
    """The autocast mode ("bf16", "fp16" or "none") :func:`predict_volume` runs under on ``device``.

    ``amp``: True / "auto": bf16 on CUDA; False / None / "none": fp32; "bf16" / "fp16": the training
    loop's ``--amp`` (already resolved or not). Half precision only on CUDA: on CPU the prediction
    always ran in fp32, so the validation of a CPU bf16 run scores what ``mambamim evaluate`` on CPU gets.

    Raises:
        ValueError: an unknown mode.
    """
    mode = "auto" if amp is True else "none" if amp is False or amp is None else str(amp)
    mode = resolve_amp(torch.device("cuda"), mode)  # checks the name; "auto" -> "bf16"
    return mode if torch.device(device).type == "cuda" else "none"


def predict_volume(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    roi: Sequence[int] = (96, 96, 96),
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    tta_flips: bool | str = False,
    device: str | torch.device | None = None,
    amp: bool | str = True,
    output: Literal["probabilities", "labels"] = "probabilities",
    mode: str = "gaussian",
    *,
    to_cpu: bool = True,
) -> torch.Tensor:
    """Segment one preprocessed volume: the one inference of ``predict``, ``evaluate`` and the
    fine-tuning validation (which picks best.pt by it).

    Args:
        model: network mapping (B, C, D, H, W) to logits (B, K, D, H, W); moved to ``device`` and put
            in eval mode here (callers that train restore the mode).
        image: (C, X, Y, Z) preprocessed volume (any size; windows are padded as needed).
        roi: window size, each side a multiple of 16 for the MambaMIM networks.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        tta_flips: see :func:`flip_sets` (False, "axes", True / "all").
        device: where to run; None = the model's device, "auto" = CUDA if available.
        amp: autocast, see :func:`inference_amp` (True: bf16 on CUDA; ignored on CPU).
        output: ``"probabilities"``: softmax (K, X, Y, Z) float32; ``"labels"``: argmax (X, Y, Z) int64.
        mode: window blending, ``"gaussian"`` (default) or ``"constant"``.
        to_cpu: False leaves the result on the device it was computed on.

    Returns:
        (K, X, Y, Z) float32 or (X, Y, Z) int64, on the CPU unless ``to_cpu`` is False.
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    roi = _check_predict_args(image, roi, overlap, sw_batch_size, output)
    flips = flip_sets(tta_flips)
    dev = run_device(model, device)
    model = model.to(dev).eval()
    x = image.to(dev, dtype=torch.float32)[None]
    precision = inference_amp(dev, amp)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast_context(dev, precision):
            return _logits(model(window)).float()

    probs: torch.Tensor | None = None
    with torch.no_grad(), cudnn_benchmark(dev):  # every window batch but the last has one shape
        for axes in flips:
            xi = torch.flip(x, axes) if axes else x
            logits = sliding_window_inference(
                xi, roi_size=roi, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode=mode
            )
            p = torch.softmax(logits.float(), dim=1)
            if axes:
                p = torch.flip(p, axes)
            probs = p if probs is None else probs + p
    assert probs is not None
    probs = probs[0] / len(flips)
    logger.debug("predicted %s with %d pass(es) on %s (%s)", tuple(image.shape), len(flips), dev, precision)
    result = probs.argmax(0) if output == "labels" else probs
    return result.cpu() if to_cpu else result


def _check_predict_args(image: torch.Tensor, roi: Sequence[int], overlap: float, sw_batch_size: int,
                        output: str) -> tuple[int, int, int]:
    """Validate :func:`predict_volume`'s arguments; returns ``roi`` as a tuple of ints."""
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(image.shape)}")
    roi = tuple(int(r) for r in roi)
    if len(roi) != 3 or any(r <= 0 for r in roi):
        raise ValueError(f"roi must be three positive sizes, got {roi}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if output not in ("probabilities", "labels"):
        raise ValueError(f"output must be 'probabilities' or 'labels', got {output!r}")
    return roi  # type: ignore[return-value]


def roi_from_info(info: dict[str, Any], default: Sequence[int] = (96, 96, 96)) -> tuple[int, int, int]:
    """The sliding-window size a checkpoint was validated with (``info["roi_size"]``), else ``default``."""
    roi = info.get("roi_size") or default
    if isinstance(roi, (int, float)):
        roi = (int(roi),) * 3
    roi = tuple(int(r) for r in roi)
    if len(roi) == 1:
        roi = roi * 3
    return roi  # type: ignore[return-value]


def centre_crop(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centre crop of a (C, X, Y, Z) volume to ``size``, zero-padded (centred) where it is smaller."""
    size = tuple(int(s) for s in size)
    out = image.new_zeros((image.shape[0], *size))
    src, dst = [], []
    for n, want in zip(image.shape[1:], size):
        take = min(n, want)
        s0, d0 = (n - take) // 2, (want - take) // 2
        src.append(slice(s0, s0 + take))
        dst.append(slice(d0, d0 + take))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


class WindowOptions(TypedDict, total=False):
    """The sliding-window keywords that whole-file segmentation, batch prediction and evaluation pass on
    to :func:`predict_labels` (defaults there): ``roi`` (None: the checkpoint's window), ``overlap``
    (0.5), ``sw_batch_size`` (4), ``tta_flips`` (False), ``device`` (None: the model's), ``amp`` (True)."""

    roi: Sequence[int] | None
    overlap: float
    sw_batch_size: int
    tta_flips: bool | str
    device: str | torch.device | None
    amp: bool | str


def predict_labels(model: nn.Module, info: dict[str, Any], image: torch.Tensor | np.ndarray,
                   **window: Unpack[WindowOptions]) -> np.ndarray:
    """Label map (X, Y, Z) int64 of one preprocessed volume (C, X, Y, Z): :func:`predict_volume` with
    ``output="labels"`` and the checkpoint's window (:func:`roi_from_info`) unless ``roi`` is given.

    Raises:
        TypeError: a keyword that is not one of :class:`WindowOptions`.
    """
    unknown = sorted(set(window) - set(WindowOptions.__annotations__))
    if unknown:
        raise TypeError(f"unknown sliding-window option(s) {unknown}; known: {sorted(WindowOptions.__annotations__)}")
    roi = window.get("roi")
    return predict_volume(
        model,
        image,
        roi=tuple(roi) if roi else roi_from_info(info),
        overlap=window.get("overlap", 0.5),
        sw_batch_size=window.get("sw_batch_size", 4),
        tta_flips=window.get("tta_flips", False),
        device=window.get("device"),
        amp=window.get("amp", True),
        output="labels",
    ).numpy()
