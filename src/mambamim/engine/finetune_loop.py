"""Segmentation fine-tuning (Swin UNETR recipe) with an optional pre-trained encoder.

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
from mambamim.engine.banner import precision_words, processes_words
from mambamim.engine.logging_utils import MetricsWriter
from mambamim.engine.pretrain_loop import (
    TrainingInterrupted,
    _make_loader,
    _prepare_for_training,
    build_train_loop,
    open_run,
    run_training,
    window_peak_memory,
)

logger = logging.getLogger(__name__)

__all__ = ["finetune", "select_cases", "validate", "model_spec"]


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


def _make_loss() -> nn.Module:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


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


def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune (or resume, with ``config.resume``) a segmentation network; returns the run folder.

    Under ``torchrun`` every process calls this; only rank 0 writes files.

    Raises:
        EncoderMismatchError: the pre-trained encoder does not fit the model (and not allow_partial).
        NonFiniteLossError: NaN / inf loss (the last checkpoint stays intact).
    """
    return run_training(config, FinetuneConfig, _finetune)


def _finetune(config: FinetuneConfig, ctx: D.DistContext) -> Path:
    with open_run(config, ctx) as session:
        run, main, resuming, cache, meta = session.run, session.main, session.resuming, session.cache, session.meta
        labels = meta.get("labels")
        if not labels:
            raise ValueError(f"the cache {cache} declares no labels: fine-tuning needs labeled data")
        num_classes = max(int(k) for k in labels) + 1
        class_names = [str(labels.get(str(i), f"class_{i}")) for i in range(num_classes)]
        shapes = [c.get("shape") for c in meta.get("cases", []) if c.get("shape")]
        in_channels = int(shapes[0][0]) if shapes else 1
        train_ids, val_ids, how = select_cases(config, meta)
        if main:
            write_json_atomic(run / "split.json", {"how": how, "train": train_ids, "validation": val_ids}, indent=1)
            logger.info("%d training and %d validation cases (%s)", len(train_ids), len(val_ids), how)

        loader = _make_loader(cache, config, ctx, labeled=True, augment=config.augment, case_ids=train_ids)
        total = config.iterations
        spec = model_spec(config, in_channels, num_classes)
        model = _make_model(spec).to(ctx.device)
        load_summary = None
        if config.pretrained and not resuming:
            weights, source = read_pretrained_weights(config.pretrained)
            pre = source.get("model") or {}
            pre_name, pre_size = pre.get("name"), (pre.get("kwargs") or {}).get("size")
            note = ""
            if (pre_name and pre_name != config.model) or (pre_size and pre_size != config.size):
                note = (f"the encoder was pre-trained for {pre_name!r} (size {pre_size}), this run fine-tunes "
                        f"{config.model!r} (size {config.size}); ")
                logger.warning("%s", note.rstrip("; "))
            try:
                report = load_encoder_weights(
                    model, weights, strict=True, allow_partial=config.allow_partial, source=str(source["path"])
                )
            except EncoderMismatchError as exc:
                raise EncoderMismatchError(note + str(exc)) from None
            load_summary = report.to_dict()
            if main:
                write_json_atomic(run / "encoder_load_report.json", load_summary, indent=1)
        loop, warmup = build_train_loop(model, config, ctx, total, session.stop)
        amp = loop.amp
        loss_fn = _make_loss()
        last_path = run / "checkpoints" / "last.pt"
        best_path = run / "checkpoints" / "best.pt"
        best_metric, best_step = -math.inf, None
        rng = None
        if resuming:
            state, rng = loop.resume_from(run, "model")
            load_summary = state.get("encoder_load")
            best_metric = float(state.get("best_metric", -math.inf) if state.get("best_metric") is not None else -math.inf)
            best_step = state.get("best_step")
            logger.info("resumed %s at iteration %d", run, loop.step)

        roi = config.roi_size
        probe_x = torch.zeros(1, in_channels, config.crop, config.crop, config.crop, device=ctx.device)
        model, forward, prepare = _prepare_for_training(loop, model, ctx, config, lambda m: m(probe_x).float().mean())

        val_ds = None
        if val_ids and config.val_every:
            from mambamim.data.loaders import build_eval_dataset

            val_ds = build_eval_dataset(cache, val_ids)
        if main:
            n_params = sum(p.numel() for p in model.parameters())
            logger.info(
                "fine-tuning %s (%s, %.2f M parameters, %d classes) on %s: %d iterations, warm-up %d iterations, %s, %s",
                config.model, config.size, n_params / 1e6, num_classes, cache, total, warmup,
                precision_words(amp), processes_words(ctx.world_size, ctx.device),
            )
        metrics = session.metrics = MetricsWriter(run, enabled=main, resume_step=loop.step if resuming else None)
        common = {
            "format": "mambamim-finetune",
            "version": 1,
            "model_config": spec,
            "labels": {str(k): str(v) for k, v in labels.items()},
            "class_names": class_names,
            "preprocessing": meta.get("preprocessing"),
            "roi_size": [roi, roi, roi],
            "split": {"train": train_ids, "validation": val_ids},
            "encoder_load": load_summary,  # what --pretrained loaded (None: from scratch)
        }

        def checkpoint() -> None:
            state = loop.state_dict("model")  # collective
            if main:
                state.update(common)
                state.update({"config": config.to_dict(), "best_metric": None if best_step is None else best_metric,
                              "best_step": best_step})
                save_checkpoint(last_path, state)
            loop.last_checkpoint, loop.last_checkpoint_step = last_path, loop.step
            D.barrier()

        def run_validation() -> None:
            nonlocal best_metric, best_step
            from mambamim.data.loaders import shard_indices

            t0 = time.perf_counter()
            mine = validate(
                D.unwrap(loop.model), val_ds, shard_indices(len(val_ds), (ctx.rank, ctx.world_size)),
                num_classes=num_classes, roi=roi, overlap=config.overlap, sw_batch_size=config.sw_batch_size,
                device=ctx.device, amp=amp,
            )
            results = [r for part in D.all_gather_objects(mine) for r in part]
            scores = np.array([r[1] for r in results], dtype=np.float64).reshape(len(results), num_classes - 1)
            with np.errstate(all="ignore"), _quiet_nan_warnings():
                per_class = np.nanmean(scores, axis=0) if len(results) else np.full(num_classes - 1, np.nan)
                mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
            row: dict[str, Any] = {"step": loop.step, "val_mean_dice": mean}
            for name, value in zip(class_names[1:], per_class):
                row[f"val_dice_{_column(name)}"] = float(value)
            improved = math.isfinite(mean) and mean > best_metric
            if improved:
                best_metric, best_step = mean, loop.step
                if main:
                    save_checkpoint(best_path, {
                        **common, "model": D.unwrap(loop.model).state_dict(), "step": loop.step,
                        "best_metric": mean, "best_step": loop.step, "per_class_dice": per_class.tolist(),
                        "config": config.to_dict(),
                    })
            if main:
                metrics.log(row, prefix="val/", phase="val")
                logger.info(
                    "iteration %d: validation mean Dice %.4f over %d cases (best %.4f at %s) in %.1f s",
                    loop.step, mean, len(results), best_metric, best_step, time.perf_counter() - t0,
                )
            D.barrier()

        end = total if config.stop_after is None else min(total, loop.step + config.stop_after)
        ckpt_every = config.checkpoint_steps or config.val_every or 1000
        pbar = session.progress_bar(config.progress, total, loop.step, "finetune", "it")
        window: list[float] = []
        t_last = time.perf_counter()
        loop.model.train()
        batches = loop.batches(loader, rng, ctx.rank, ctx.world_size) if loop.step < end else iter(())
        for batch in batches:
            x = prepare(batch["image"].to(ctx.device, non_blocking=True))
            y = batch["label"].to(ctx.device, non_blocking=True)
            with loop.autocast():
                logits = forward(x)
            loss = loss_fn(logits.float(), y)
            loss_value, grad_norm = loop.backward_step(loss)
            window.append(loss_value)
            if pbar is not None:
                pbar.update(1)
            if loop.step % config.log_every == 0 or loop.step == end:
                now = time.perf_counter()
                sec = (now - t_last) / len(window)
                t_last = now
                row = {"step": loop.step, "epoch": loop.position.epoch, "loss": sum(window) / len(window),
                       "lr": loop.lr, "sec_per_step": sec}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                row.update(window_peak_memory(ctx.device))
                metrics.log(row, prefix="train/", phase="train")
                if pbar is not None:
                    pbar.set_postfix(loss=f"{row['loss']:.4f}", best=f"{best_metric:.3f}" if best_step else "-")
                window = []
            validated = False
            if val_ds is not None and (loop.step % config.val_every == 0 or loop.step == total):
                run_validation()
                validated = True
            if loop.step % ckpt_every == 0 or validated or loop.step >= end or loop.stop_requested:
                checkpoint()
            if loop.step >= end or loop.stop_requested:
                break
        if loop.last_checkpoint_step != loop.step:
            checkpoint()
        if loop.stop_requested:
            raise TrainingInterrupted(f"stopped by a signal at iteration {loop.step}/{total}; checkpoint {last_path}; "
                                      f"continue with --resume {run}")
        if main:
            done = "finished" if loop.step >= total else f"stopped at iteration {loop.step}/{total} (resume with --resume {run})"
            best = f"best mean Dice {best_metric:.4f} at iteration {best_step}" if best_step is not None else "no validation"
            logger.info("fine-tuning %s; %s", done, best)
        return run


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
