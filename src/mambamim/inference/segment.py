"""Whole-file segmentation: read, preprocess, predict, and map the label map back to the input's grid."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from mambamim.inference.sliding_window import WindowOptions, predict_labels

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["segment_image", "load_case", "write_case"]


def segment_image(
    model: nn.Module,
    info: dict[str, Any],
    image_paths: Sequence[str] | str,
    out_path: str | os.PathLike | None = None,
    **window: Unpack[WindowOptions],
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one image file (or DICOM series) and return / write the label map in its own grid.

    Preprocesses with the checkpoint's parameters (``info["preprocessing"]``), runs
    :func:`predict_volume`, and maps the label map back with the exact inverse of preprocessing
    (:func:`mambamim.data.preprocess.restore_to_original`).

    Args:
        model, info: from :func:`load_segmenter`.
        image_paths: one path per input channel (NIfTI file or DICOM series folder).
        out_path: where to write the NIfTI label map atomically; None writes nothing.
        window: ``roi`` (default: the checkpoint's), ``overlap``, ``sw_batch_size``, ``tta_flips``,
            ``device``, ``amp``: see :func:`mambamim.inference.predict_volume` and :class:`WindowOptions`.

    Returns:
        ``(labels (X0, Y0, Z0) uint8 / uint16 in the input's voxel grid, the input's affine 4x4)``.

    Raises:
        mambamim.data.errors.DataError: the input cannot be read (names the file).
    """
    image, meta = load_case(info, image_paths)
    labels = predict_labels(model, info, torch.from_numpy(image), **window)
    return write_case(labels, meta, out_path)


def load_case(info: dict[str, Any], image_paths: Sequence[str] | str) -> tuple[np.ndarray, dict[str, Any]]:
    """The first stage of :func:`segment_image`: read and preprocess with the checkpoint's parameters.

    Returns ``(image (C, X, Y, Z) float32, meta)``. Raises DataError naming the file for a bad input or a
    channel count the network does not take. Runs no network: :func:`mambamim.inference.batch.predict_files`
    calls it for the next case while the network runs on the current one."""
    from mambamim.data.errors import DataError
    from mambamim.data.preprocess import PreprocessParams, preprocess_image

    paths = [str(image_paths)] if isinstance(image_paths, (str, os.PathLike)) else [str(p) for p in image_paths]
    image, meta = preprocess_image(paths, PreprocessParams.from_dict(info.get("preprocessing")))
    want = int(info.get("in_channels") or image.shape[0])
    if image.shape[0] != want:
        raise DataError(paths[0], f"{image.shape[0]} input channel(s) given, the model expects {want}")
    return image, meta


def write_case(labels: np.ndarray, meta: dict[str, Any], out_path: str | os.PathLike | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The last stage of :func:`segment_image`: a label map in cache space back to the input's grid
    (uint8, or uint16 past 255 classes), written atomically to ``out_path`` unless None.
    Returns ``(labels in the input's grid, its affine)``."""
    from mambamim.data.preprocess import restore_to_original, save_nifti_atomic

    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    restored, affine = restore_to_original(labels.astype(dtype), meta, is_label=True)
    restored = restored.astype(dtype, copy=False)
    if out_path is not None:
        save_nifti_atomic(restored, affine, out_path)
    return restored, affine
