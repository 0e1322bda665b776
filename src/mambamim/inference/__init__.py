"""Inference, beside the training engine: sliding-window prediction with Gaussian blending and flip TTA
(:func:`predict_volume`, used by fine-tuning validation, ``evaluate`` and ``predict``; :func:`predict_labels`
with :class:`WindowOptions`), whole-file segmentation back in the input's own grid (:func:`segment_image`),
many files at once (:func:`predict_files`) and the reconstruction figure
(:func:`reconstruct_image`). Loading networks from checkpoints is the engine's
(:mod:`mambamim.engine.inference`); this package imports nothing from ``engine``."""

from mambamim.inference.batch import CaseOutcome, PredictionResult, predict_files
from mambamim.inference.reconstruct import reconstruct_image
from mambamim.inference.segment import segment_image
from mambamim.inference.sliding_window import (
    CompiledSegmenter,
    TTAMode,
    WindowOptions,
    centre_crop,
    compile_segmenter,
    flip_sets,
    inference_amp,
    predict_labels,
    predict_volume,
    roi_from_info,
)
from mambamim.runtime.device import resolve_device

__all__ = ["predict_volume", "segment_image", "reconstruct_image", "compile_segmenter", "CompiledSegmenter",
           "flip_sets", "inference_amp", "roi_from_info", "centre_crop", "resolve_device", "TTAMode", "WindowOptions",
           "predict_labels", "predict_files", "PredictionResult", "CaseOutcome"]
