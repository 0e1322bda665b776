"""Sliding-window inference with optional flip test-time augmentation.

:func:`predict_volume` runs a segmentation network over a whole preprocessed volume with
:func:`monai.inferers.sliding_window_inference` (Gaussian blending of overlapping windows),
under bf16 autocast on CUDA, and optionally averages the softmax over flipped copies of the
input (each flipped back before averaging). The fine-tuning validation runs it too, so best.pt is
chosen under the inference that ``predict`` and ``evaluate`` give.
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

from mambamim.engine import distributed as D
from mambamim.engine.compiling import CompiledOrEager

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
    mode = D.resolve_amp(torch.device("cuda"), mode)  # checks the name; "auto" -> "bf16"
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
    if device is None:
        try:
            dev = next(model.parameters()).device
        except StopIteration:
            dev = torch.device("cpu")
    else:
        dev = resolve_device(device)
    model = model.to(dev).eval()
    x = image.to(dev, dtype=torch.float32)[None]
    precision = inference_amp(dev, amp)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with D.autocast_context(dev, precision):
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


# ------------------------------------------------------------------------------ reconstruction (Fig. 9)


def load_pretrainer(
    checkpoint: str | os.PathLike, device: str | torch.device | None = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a MambaMIM pre-trainer (encoder + light decoder) from a pre-training checkpoint.

    Args:
        checkpoint: ``RUN/checkpoints/last.pt`` (or ``epoch_NNNN.pt``) of ``mambamim pretrain``, or the run
            folder itself.

    Returns:
        ``(pretrainer in eval mode on device, info)``; info has ``config`` (the run's PretrainConfig
        dict), ``preprocessing`` (dict or None), ``crop`` (training crop side), ``mask_ratio``,
        ``step`` and ``path``.

    Raises:
        FileNotFoundError: no such file / no checkpoint in the run folder.
        mambamim.engine.checkpoint.CheckpointError: unreadable, or not a pre-training checkpoint.
    """
    from pathlib import Path

    from mambamim.engine.checkpoint import CheckpointError, load_checkpoint

    path = Path(checkpoint)
    run_dir = None
    if path.is_dir():
        run_dir = path
        path = path / "checkpoints" / "last.pt"
        if not path.exists():
            raise FileNotFoundError(f"no checkpoints/last.pt in pre-training run folder {run_dir}")
    ckpt = load_checkpoint(path)
    fmt = ckpt.get("format")
    if fmt == "mambamim-encoder":
        raise CheckpointError(
            f"{path} holds only the pre-trained encoder; the reconstruction needs the decoder too: "
            "give the run's checkpoints/last.pt"
        )
    if fmt != "mambamim-pretrain" or not isinstance(ckpt.get("config"), dict) or "pretrainer" not in ckpt:
        raise CheckpointError(f"{path} is not a mambamim pre-training checkpoint (format={fmt!r})")
    cfg = ckpt["config"]
    pretrainer = _build_pretrainer(cfg)
    state = ckpt["pretrainer"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    pretrainer.load_state_dict(state, strict=True)
    preprocessing = ckpt.get("preprocessing")
    if preprocessing is None:
        preprocessing = _preprocessing_near(path, run_dir, cfg)
    info = {
        "config": cfg,
        "preprocessing": preprocessing,
        "crop": int(cfg.get("crop", 96)),
        "mask_ratio": float(cfg.get("mask_ratio", 0.75)),
        "in_channels": int(cfg.get("in_channels", 1)),
        "step": ckpt.get("step"),
        "path": str(path),
    }
    return pretrainer.to(resolve_device(device)).eval(), info


def _build_pretrainer(cfg: dict[str, Any]) -> nn.Module:
    """The pre-trainer a run's saved configuration describes, built as the training loop builds it."""
    try:
        from mambamim.engine.config import PretrainConfig
        from mambamim.engine.pretrain_loop import _make_pretrainer

        return _make_pretrainer(PretrainConfig.from_dict(dict(cfg)))
    except (ImportError, TypeError, ValueError) as exc:  # an older / foreign config: build from its keys
        logger.debug("building the pre-trainer from raw config keys (%s)", exc)
    from mambamim.engine.config import model_size_kwargs
    from mambamim.pretrain import create_pretrainer

    extra = {} if cfg.get("decoder_width") is None else {"decoder_width": int(cfg["decoder_width"])}
    return create_pretrainer(
        cfg.get("model", "hymamba"),
        in_channels=int(cfg.get("in_channels", 1)),
        mask_ratio=float(cfg.get("mask_ratio", 0.75)),
        token=cfg.get("token", "toki"),
        skip=bool(cfg.get("skip", True)),
        bottom_up=bool(cfg.get("bottom_up", True)),
        scan=cfg.get("scan", "raster"),
        **model_size_kwargs(cfg.get("size", "base")),
        **extra,
    )


def _preprocessing_near(path, run_dir, cfg: dict) -> dict | None:
    """The preprocessing of a pre-training run: its encoder.pt, else the cache it trained on."""
    from pathlib import Path

    from mambamim.engine.checkpoint import load_checkpoint

    run = run_dir or Path(path).resolve().parent.parent
    enc = Path(run) / "encoder.pt"
    if enc.is_file():
        try:
            pre = load_checkpoint(enc).get("preprocessing")
            if pre:
                return pre
        except Exception as exc:  # fall through to the cache
            logger.debug("cannot read %s: %s", enc, exc)
    from mambamim.engine.config import find_cache, read_cache_meta

    for candidate in (cfg.get("data"), str(Path(run) / "cache")):
        if candidate and os.path.exists(candidate):
            cache = find_cache(candidate)
            if cache is not None:
                return read_cache_meta(cache).get("preprocessing")
    logger.warning("no preprocessing recorded for %s: using the defaults", path)
    return None


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


def reconstruct_image(
    pretrainer: nn.Module,
    info: dict[str, Any],
    image_paths: Sequence[str] | str,
    out_png: str | os.PathLike,
    *,
    mask_ratio: float | None = None,
    seed: int = 0,
    crop: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = True,
) -> dict[str, Any]:
    """Paper Fig. 9 for one image: preprocess, centre-crop to the model's size, mask with a seeded
    random bottleneck mask, reconstruct and render masked input / reconstruction / original.

    Args:
        pretrainer, info: from :func:`load_pretrainer`.
        image_paths: NIfTI file or DICOM series folder (one per channel).
        out_png: the PNG to write (atomically).
        mask_ratio: fraction of bottleneck tokens masked; default the run's.
        seed: seeds the mask, so a figure is reproducible.
        crop: crop side (multiple of 16); default the run's training crop.

    Returns:
        ``{"png": path, "loss": float, "visible": int, "tokens": int, "crop": int}``.
    """
    from mambamim.data.preprocess import PreprocessParams, preprocess_image
    from mambamim.masking.masks import random_bottleneck_mask
    from mambamim.pretrain.visualize import render_reconstruction

    ratio = float(info.get("mask_ratio", 0.75) if mask_ratio is None else mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    side = int(crop or info.get("crop", 96))
    if side < 16 or side % 16:
        raise ValueError(f"crop must be a positive multiple of 16, got {side}")
    paths = [str(image_paths)] if isinstance(image_paths, (str, os.PathLike)) else [str(p) for p in image_paths]
    params = PreprocessParams.from_dict(info.get("preprocessing"))
    image, _ = preprocess_image(paths, params)
    x = centre_crop(torch.from_numpy(image), (side,) * 3)[None]
    if device is None:
        try:
            dev = next(pretrainer.parameters()).device
        except StopIteration:
            dev = torch.device("cpu")
    else:
        dev = resolve_device(device)
    pretrainer = pretrainer.to(dev).eval()
    x = x.to(dev)
    gen = torch.Generator().manual_seed(int(seed))
    mask = random_bottleneck_mask(1, [side // 16] * 3, ratio, generator=gen, device=dev)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and dev.type == "cuda") else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out = pretrainer(x, mask=mask)
    png = render_reconstruction(
        x.float().cpu(), out["reconstruction"].float().cpu(), out["mask"].cpu(), out_png,
        title=f"{os.path.basename(paths[0])}: MambaMIM reconstruction, mask ratio {ratio:.2f}, seed {seed}",
        window=(params.hu_min, params.hu_max),
    )
    visible = int(out["mask"].sum().item())
    return {"png": str(png), "loss": float(out["loss"].float().item()), "visible": visible,
            "tokens": int(out["mask"].numel()), "crop": side}
