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
import os
from typing import Any, Literal, Sequence

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


# ------------------------------------------------------------------------- whole-file segmentation


def load_segmenter(
    checkpoint: str | os.PathLike, device: str | torch.device | None = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned network from its checkpoint (file or run folder) for inference.

    Returns:
        ``(model in eval mode on device, info)``; info as in
        :func:`mambamim.engine.checkpoint.model_from_checkpoint` (``class_names``, ``preprocessing``,
        ``roi_size``, ``in_channels``, ...).

    Raises:
        FileNotFoundError: no such checkpoint.
        mambamim.engine.checkpoint.CheckpointError: corrupt, truncated or not a fine-tuning checkpoint.
    """
    from mambamim.engine.checkpoint import model_from_checkpoint

    dev = resolve_device(device)
    model, info = model_from_checkpoint(checkpoint, map_location="cpu")
    return model.to(dev).eval(), info


def roi_from_info(info: dict[str, Any], default: Sequence[int] = (96, 96, 96)) -> tuple[int, int, int]:
    """The sliding-window size a checkpoint was validated with (``info["roi_size"]``), else ``default``."""
    roi = info.get("roi_size") or default
    if isinstance(roi, (int, float)):
        roi = (int(roi),) * 3
    roi = tuple(int(r) for r in roi)
    if len(roi) == 1:
        roi = roi * 3
    return roi  # type: ignore[return-value]


def segment_image(
    model: nn.Module,
    info: dict[str, Any],
    image_paths: Sequence[str] | str,
    out_path: str | os.PathLike | None = None,
    *,
    roi: Sequence[int] | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    tta_flips: bool | str = False,
    device: str | torch.device | None = None,
    amp: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one image file (or DICOM series) and return / write the label map in its own grid.

    Preprocesses with the checkpoint's parameters (``info["preprocessing"]``), runs
    :func:`predict_volume`, and maps the label map back with the exact inverse of preprocessing
    (:func:`mambamim.data.preprocess.restore_to_original`).

    Args:
        model, info: from :func:`load_segmenter`.
        image_paths: one path per input channel (NIfTI file or DICOM series folder).
        out_path: where to write the NIfTI label map atomically; None writes nothing.
        roi: window size; default from ``info`` (:func:`roi_from_info`).

    Returns:
        ``(labels (X0, Y0, Z0) uint8 / uint16 in the input's voxel grid, the input's affine 4x4)``.

    Raises:
        mambamim.data.errors.DataError: the input cannot be read (names the file).
    """
    from mambamim.data.errors import DataError
    from mambamim.data.preprocess import PreprocessParams, preprocess_image, restore_to_original, save_nifti_atomic

    paths = [str(image_paths)] if isinstance(image_paths, (str, os.PathLike)) else [str(p) for p in image_paths]
    params = PreprocessParams.from_dict(info.get("preprocessing"))
    image, meta = preprocess_image(paths, params)
    want = int(info.get("in_channels") or image.shape[0])
    if image.shape[0] != want:
        raise DataError(paths[0], f"{image.shape[0]} input channel(s) given, the model expects {want}")
    labels = predict_volume(
        model,
        torch.from_numpy(image),
        roi=roi or roi_from_info(info),
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        tta_flips=tta_flips,
        device=device,
        amp=amp,
        output="labels",
    ).numpy()
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    restored, affine = restore_to_original(labels.astype(dtype), meta, is_label=True)
    restored = restored.astype(dtype, copy=False)
    if out_path is not None:
        save_nifti_atomic(restored, affine, out_path)
    return restored, affine
