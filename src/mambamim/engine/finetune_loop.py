"""Segmentation fine-tuning (Swin UNETR recipe) with an optional pre-trained encoder:
:class:`FinetuneTrainer`, the :class:`mambamim.engine.trainer.Trainer` whose step is Dice + CE on
labelled crops and which validates on held-out cases, and :func:`finetune`, its entry point.

Run folder::

    RUN/config.yaml, log.txt, metrics.csv, tensorboard/
    RUN/split.json                        the training and validation case ids
    RUN/encoder_load_report.json          what the pre-trained encoder load did (when --pretrained)
    RUN/checkpoints/last.pt               full training state (atomic)
    RUN/checkpoints/best.pt               best mean validation Dice (weights only, no optimiser)

Both checkpoints carry ``model_config`` (name + kwargs), ``labels``, ``preprocessing`` and
``roi_size``, so :func:`mambamim.engine.checkpoint.model_from_checkpoint` rebuilds the network
with nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mambamim.engine import distributed as D
from mambamim.atomic import write_json_atomic
from mambamim.engine.checkpoint import (
    EncoderMismatchError,
    load_encoder_weights,
    read_pretrained_weights,
    save_checkpoint,
)
from mambamim.engine.config import FinetuneConfig, model_size_kwargs
from mambamim.engine.trainer import Trainer, make_train_loader

logger = logging.getLogger(__name__)

__all__ = ["finetune", "FinetuneTrainer", "select_cases", "validate", "model_spec"]


def _read_id_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"validation case list not found: {path}")
    text = path.read_text().strip()
    if text.startswith("[") or text.startswith("{"):
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("validation", data.get("val"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of case ids (or {{'validation': [...]}})")
        return [str(x) for x in data]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def select_cases(config: FinetuneConfig, meta: dict[str, Any]) -> tuple[list[str], list[str], str]:
    """Training and validation case ids from the cache index and the options.

    Order of precedence: ``val_cases`` file; ``fold`` (``-1``: no validation); the cache's
    ``validation`` list or cases marked split "val"; fold 0 of ``num_folds``. Cases marked split
    "test" never train. Only labeled cases are used.

    Returns:
        (train ids, validation ids, a description of the split).

    Raises:
        ValueError: unknown validation ids, or no training case left.
    """
    from mambamim.data.loaders import split_cases

    cases = meta.get("cases", [])
    labeled = [str(c["id"]) for c in cases if c.get("label")]
    if not labeled:
        raise ValueError("the cache has no labeled case: fine-tuning needs labels")
    test = {str(c["id"]) for c in cases if str(c.get("split") or "").lower() == "test"}
    pool = [i for i in labeled if i not in test]
    if config.val_cases:
        val = _read_id_file(config.val_cases)
        unknown = sorted(set(val) - set(labeled))
        if unknown:
            raise ValueError(f"validation ids not among the cache's labeled cases: {unknown[:10]}")
        how = f"validation cases from {config.val_cases}"
    elif config.fold is not None and config.fold < 0:
        val, how = [], "no validation (fold -1)"
    elif config.fold is not None:
        val = _fold(split_cases, pool, config.fold, config.num_folds)
        how = f"fold {config.fold} of {config.num_folds}"
    else:
        listed = [str(v) for v in meta.get("validation") or []]
        marked = [str(c["id"]) for c in cases if str(c.get("split") or "").lower() in ("val", "validation")]
        given = [i for i in (listed or marked) if i in set(labeled)]
        if given:
            val, how = given, "the dataset's validation list"
        else:
            val = _fold(split_cases, pool, 0, config.num_folds)
            how = f"fold 0 of {config.num_folds}"
    val_set = set(val)
    train = [i for i in pool if i not in val_set]
    if not train:
        raise ValueError(f"no training case left ({how}; {len(labeled)} labeled, {len(test)} test)")
    return train, sorted(val), how


def _fold(split_cases: Any, pool: list[str], fold: int, num_folds: int) -> list[str]:
    if len(pool) < num_folds:
        raise ValueError(
            f"{len(pool)} labeled cases cannot be split into {num_folds} folds: use --num-folds "
            f"{max(2, len(pool))} or fewer, --val-cases FILE, or --fold -1 (no validation)"
        )
    return split_cases(pool, fold, num_folds, seed=0)[1]


def model_spec(config: FinetuneConfig, in_channels: int, num_classes: int) -> dict[str, Any]:
    """{"name", "kwargs"} that rebuild the network with ``create_model(name, **kwargs)``; the
    kwargs are the size preset resolved to explicit values when the registry allows it."""
    kwargs = {"in_channels": in_channels, "num_classes": num_classes, "scan": config.scan}
    try:
        from mambamim.models import model_config

        full = model_config(config.model, config.size, **kwargs)
    except (ImportError, TypeError):
        full = {**model_size_kwargs(config.size), **kwargs}
    return {"name": config.model, "kwargs": full}


def _make_model(spec: dict[str, Any]) -> nn.Module:
    from mambamim.models import create_model

    return create_model(spec["name"], **spec["kwargs"])


def validate(
    model: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    num_classes: int,
    roi: int,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    device: torch.device = torch.device("cpu"),
    amp: str = "none",
) -> list[tuple[str, list[float]]]:
    """Dice of ``model`` on ``dataset[i]`` for i in ``indices``, under the inference users run.

    Each case goes through :func:`mambamim.inference.predict_volume` (its Gaussian window
    blending, softmax and argmax; no TTA) and is scored with
    :func:`mambamim.evaluation.report.case_dice`, the Dice of ``mambamim evaluate``: so best.pt is
    the best checkpoint for what ``evaluate`` / ``predict`` report at the same overlap.

    Args:
        model: maps (B, C, roi, roi, roi) to logits (B, num_classes, roi, roi, roi); put in eval
            mode for the cases and given back in the mode it came in.
        dataset: items {"image": (C, X, Y, Z) float, "label": (1, X, Y, Z) int, "case_id"}.
        amp: the training loop's precision ("bf16", "fp16", "none" or "auto"), used on CUDA only
            (see :func:`mambamim.inference.inference_amp`).

    Returns:
        [(case id, Dice of classes 1..num_classes-1)], NaN where a class is in neither the
        reference nor the prediction, 0 where it is in only one of them.
    """
    from mambamim.inference import predict_volume
    from mambamim.evaluation.report import case_dice

    was_training = model.training
    out: list[tuple[str, list[float]]] = []
    try:
        for i in indices:
            item = dataset[i]
            # labels stay on the device: the Dice of a large volume is cheap there, slow on the host
            pred = predict_volume(model, item["image"], roi=(roi, roi, roi), overlap=overlap,
                                  sw_batch_size=sw_batch_size, device=device, amp=amp, output="labels",
                                  to_cpu=False)
            dice = case_dice(pred, item["label"][0], range(1, num_classes))
            out.append((str(item.get("case_id", i)), dice))
    finally:
        model.train(was_training)
    return out


def _column(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or "class"


class FinetuneTrainer(Trainer):
    """Segmentation fine-tuning: Dice + CE on labelled crops; validation on held-out cases every
    ``val_every`` iterations keeps ``best.pt`` (weights only) by mean validation Dice."""

    kind, verb, unit, module_key = "finetune", "fine-tuning", "iteration", "model"
    config_cls = FinetuneConfig

    def read_dataset(self) -> None:
        super().read_dataset()
        labels, config = self.meta.get("labels"), self.config
        if not labels:
            raise ValueError(f"the cache {self.cache} declares no labels: fine-tuning needs labeled data")
        self.labels = labels
        self.num_classes = max(int(k) for k in labels) + 1
        self.class_names = [str(labels.get(str(i), f"class_{i}")) for i in range(self.num_classes)]
        self.train_ids, self.val_ids, how = select_cases(config, self.meta)
        if self.main:
            write_json_atomic(self.run / "split.json", {"how": how, "train": self.train_ids,
                                                         "validation": self.val_ids}, indent=1)
            logger.info("%d training and %d validation cases (%s)", len(self.train_ids), len(self.val_ids), how)
        self.spec = model_spec(config, self.in_channels, self.num_classes)
        self.best_metric, self.best_step = -math.inf, None
        self.load_summary: dict[str, Any] | None = None

    def build_loader(self) -> Any:
        return make_train_loader(self.cache, self.config, self.ctx, labeled=True, augment=self.config.augment,
                                 case_ids=self.train_ids)

    def planned_steps(self) -> int:
        return self.config.iterations

    def build_model(self) -> nn.Module:
        return _make_model(self.spec)

    def init_weights(self, model: nn.Module) -> None:
        """The pre-trained encoder of ``config.pretrained`` (a new run only: a resumed one has its own)."""
        config = self.config
        if not config.pretrained or self.resuming:
            return
        weights, source = read_pretrained_weights(config.pretrained)
        pre = source.get("model") or {}
        pre_name, pre_size = pre.get("name"), (pre.get("kwargs") or {}).get("size")
        note = ""
        if (pre_name and pre_name != config.model) or (pre_size and pre_size != config.size):
            note = (f"the encoder was pre-trained for {pre_name!r} (size {pre_size}), this run fine-tunes "
                    f"{config.model!r} (size {config.size}); ")
            logger.warning("%s", note.rstrip("; "))
        try:
            report = load_encoder_weights(model, weights, strict=True, allow_partial=config.allow_partial,
                                          source=str(source["path"]))
        except EncoderMismatchError as exc:
            raise EncoderMismatchError(note + str(exc)) from None
        self.load_summary = report.to_dict()
        if self.main:
            write_json_atomic(self.run / "encoder_load_report.json", self.load_summary, indent=1)

    def on_resume(self, state: dict[str, Any]) -> None:
        self.load_summary = state.get("encoder_load")
        best = state.get("best_metric")
        self.best_metric = float(best) if best is not None else -math.inf
        self.best_step = state.get("best_step")

    def after_setup(self) -> None:
        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.val_ds = None
        if self.val_ids and self.config.val_every:
            from mambamim.data.loaders import build_eval_dataset

            self.val_ds = build_eval_dataset(self.cache, self.val_ids)
        roi = self.config.roi_size
        self.common = {
            "format": "mambamim-finetune",
            "version": 1,
            "model_config": self.spec,
            "labels": {str(k): str(v) for k, v in self.labels.items()},
            "class_names": self.class_names,
            "preprocessing": self.meta.get("preprocessing"),
            "roi_size": [roi, roi, roi],
            "split": {"train": self.train_ids, "validation": self.val_ids},
            "encoder_load": self.load_summary,  # what --pretrained loaded (None: from scratch)
        }

    def model_words(self) -> str:
        return f", {self.num_classes} classes"

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x = self.inputs(batch)
        y = batch["label"].to(self.ctx.device, non_blocking=True)
        return self.loss_fn(self.forward(x).float(), y)

    def probe_loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).float().mean()

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "best": f"{self.best_metric:.3f}" if self.best_step else "-"}

    def on_step_end(self, end: int) -> None:
        loop, config = self.loop, self.config
        validated = self.val_ds is not None and (loop.step % config.val_every == 0 or loop.step == self.total)
        if validated:
            self.run_validation()
        every = config.checkpoint_steps or config.val_every or 1000
        if loop.step % every == 0 or validated or loop.step >= end or loop.stop_requested:
            self.checkpoint()

    def run_validation(self) -> None:
        """Mean Dice of the validation cases (sharded over ranks): a ``val/`` metrics row, and
        ``best.pt`` when it improves. Collective under DDP."""
        from mambamim.data.loaders import shard_indices

        t0, ctx, loop = time.perf_counter(), self.ctx, self.loop
        mine = validate(
            D.unwrap(loop.model), self.val_ds, shard_indices(len(self.val_ds), (ctx.rank, ctx.world_size)),
            num_classes=self.num_classes, roi=self.config.roi_size, overlap=self.config.overlap,
            sw_batch_size=self.config.sw_batch_size, device=ctx.device, amp=loop.amp,
        )
        results = [r for part in D.all_gather_objects(mine) for r in part]
        per_class, mean = _mean_dice(results, self.num_classes)
        row: dict[str, Any] = {"step": loop.step, "val_mean_dice": mean}
        for name, value in zip(self.class_names[1:], per_class):
            row[f"val_dice_{_column(name)}"] = float(value)
        if math.isfinite(mean) and mean > self.best_metric:
            self.best_metric, self.best_step = mean, loop.step
            if self.main:
                save_checkpoint(self.run / "checkpoints" / "best.pt", {
                    **self.common, "model": D.unwrap(loop.model).state_dict(), "step": loop.step,
                    "best_metric": mean, "best_step": loop.step, "per_class_dice": per_class.tolist(),
                    "config": self.config.to_dict(),
                })
        if self.main:
            self.metrics.log(row, prefix="val/", phase="val")
            logger.info("iteration %d: validation mean Dice %.4f over %d cases (best %.4f at %s) in %.1f s",
                        loop.step, mean, len(results), self.best_metric, self.best_step, time.perf_counter() - t0)
        D.barrier()

    def checkpoint_extras(self) -> dict[str, Any]:
        return {**self.common, "best_metric": None if self.best_step is None else self.best_metric,
                "best_step": self.best_step}

    def on_train_end(self) -> None:
        if self.main:
            loop, run = self.loop, self.run
            done = "finished" if loop.step >= self.total else \
                f"stopped at iteration {loop.step}/{self.total} (resume with --resume {run})"
            best = (f"best mean Dice {self.best_metric:.4f} at iteration {self.best_step}"
                    if self.best_step is not None else "no validation")
            logger.info("fine-tuning %s; %s", done, best)


def _mean_dice(results: list[tuple[str, list[float]]], num_classes: int) -> tuple[np.ndarray, float]:
    """(per-class mean Dice over cases, mean over classes), NaN-aware (classes absent everywhere are NaN)."""
    scores = np.array([r[1] for r in results], dtype=np.float64).reshape(len(results), num_classes - 1)
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        per_class = np.nanmean(scores, axis=0) if len(results) else np.full(num_classes - 1, np.nan)
        mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return per_class, mean


def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune (or resume, with ``config.resume``) a segmentation network; returns the run folder.

    Under ``torchrun`` every process calls this; only rank 0 writes files.

    Raises:
        EncoderMismatchError: the pre-trained encoder does not fit the model (and not allow_partial).
        NonFiniteLossError: NaN / inf loss (the last checkpoint stays intact).
        TrainingInterrupted: SIGINT / SIGTERM, after a checkpoint.
    """
    return FinetuneTrainer.train(config)


class _quiet_nan_warnings:
    """Silence NumPy's 'Mean of empty slice' for classes absent from every validation case."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
