"""Sliding-window inference with optional flip test-time augmentation.

:func:`predict_volume` runs a segmentation network over a whole preprocessed volume with
:func:`monai.inferers.sliding_window_inference` (Gaussian blending of overlapping windows),
under bf16 autocast on CUDA, and optionally averages the softmax over flipped copies of the
input (each flipped back before averaging).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Literal, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

logger = logging.getLogger(__name__)

TTAMode = Literal["none", "axes", "all"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` / None -> CUDA when available else CPU; anything else as ``torch.device``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    return dev


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


def _logits(out) -> torch.Tensor:
    # deep-supervision models may return several outputs: the first is the full-resolution one
    if isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, dict):
        out = out["logits"]
    return out


def predict_volume(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    roi: Sequence[int] = (96, 96, 96),
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    tta_flips: bool | str = False,
    device: str | torch.device | None = None,
    amp: bool = True,
    output: Literal["probabilities", "labels"] = "probabilities",
    mode: str = "gaussian",
) -> torch.Tensor:
    """Segment one preprocessed volume.

    Args:
        model: network mapping (B, C, D, H, W) to logits (B, K, D, H, W); put in eval mode here.
        image: (C, X, Y, Z) preprocessed volume (any size; windows are padded as needed).
        roi: window size, each side a multiple of 16 for the MambaMIM networks.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        tta_flips: see :func:`flip_sets` (False, "axes", True / "all").
        device: where to run; None = the model's device, "auto" = CUDA if available.
        amp: bf16 autocast on CUDA (ignored on CPU).
        output: ``"probabilities"``: softmax (K, X, Y, Z) float32; ``"labels"``: argmax (X, Y, Z) int64.
        mode: window blending, ``"gaussian"`` (default) or ``"constant"``.

    Returns:
        A CPU tensor, (K, X, Y, Z) float32 or (X, Y, Z) int64.
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
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
    flips = flip_sets(tta_flips)

    if device is None:
        try:
            dev = next(model.parameters()).device
        except StopIteration:
            dev = torch.device("cpu")
    else:
        dev = resolve_device(device)
    model = model.to(dev).eval()
    x = image.to(dev, dtype=torch.float32)[None]
    use_amp = bool(amp) and dev.type == "cuda"

    def predictor(window: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with ctx:
            return _logits(model(window)).float()

    probs: torch.Tensor | None = None
    with torch.no_grad():
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
    logger.debug("predicted %s with %d pass(es) on %s", tuple(image.shape), len(flips), dev)
    if output == "labels":
        return probs.argmax(0).cpu()
    return probs.cpu()
