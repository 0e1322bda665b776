"""The whole MambaMIM pipeline on synthetic data, small enough for a CPU in minutes.

:func:`run_demo` writes synthetic CT phantoms, prepares them into a cache, pre-trains a tiny
HyMamba with MambaMIM, fine-tunes it on a few labeled cases twice (from scratch and from the
pre-trained encoder), evaluates both on held-out cases, compares them with paired tests and
writes ``OUT/report.md`` with tables and figures (Fig. 9 reconstruction, loss curves, per-class
Dice, a slice overlay of a prediction).

Layout of ``OUT``::

    raw/                synthetic phantoms (Decathlon layout)
    cache/              the prepared cache
    pretrain/           the pre-training run (checkpoints, encoder.pt, metrics.csv)
    finetune_scratch/   fine-tuning from random initialisation
    finetune_pretrained/ fine-tuning from the pre-trained encoder
    eval_scratch/, eval_pretrained/   per_case.csv, summary.json, summary.md
    figures/            PNGs used by the report
    report.md, demo.json
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mambamim.atomic import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults took 158 s wall on 2 shared CPU cores (torch 2.13 CPU).

    ``spacing`` is the preprocessing voxel size in mm (coarse, so volumes are ~50-70 voxels a side);
    ``crop`` the training / sliding-window side; ``num_test`` cases are held out for evaluation,
    the remaining labeled ones fine-tune; all cases (labels unused) pre-train.
    """

    num_cases: int = 10
    num_test: int = 3
    crop: int = 32
    spacing: float = 6.0
    model: str = "hymamba"
    size: str = "tiny"
    mask_ratio: float = 0.75
    decoder_width: int = 128
    pretrain_steps: int = 100
    finetune_iterations: int = 300
    batch_size: int = 2
    num_crops: int = 2
    lr_pretrain: float = 1e-3
    lr_finetune: float = 5e-3
    seed: int = 0

    def validate(self) -> None:
        if self.num_cases < 3:
            raise ValueError(f"num_cases must be >= 3, got {self.num_cases}")
        if not 1 <= self.num_test < self.num_cases:
            raise ValueError(f"num_test must be in [1, num_cases), got {self.num_test}")
        if self.crop < 16 or self.crop % 16:
            raise ValueError(f"crop must be a positive multiple of 16, got {self.crop}")
        if self.spacing <= 0:
            raise ValueError(f"spacing must be > 0, got {self.spacing}")
        for name in ("pretrain_steps", "finetune_iterations", "batch_size", "num_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick(cls) -> "DemoSettings":
        """The smallest setting that still runs every stage (for tests)."""
        return cls(num_cases=3, num_test=1, pretrain_steps=2, finetune_iterations=2, batch_size=1, num_crops=1)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: the report, the runs, the scores and the stage timings (s)."""

    report: Path
    out: Path
    pretrain_run: Path
    finetune_runs: dict[str, Path]
    evaluations: dict[str, Path]
    mean_dice: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)


def _finetune_fn() -> Callable[[Any], Path]:
    import importlib

    for mod in ("mambamim.engine", "mambamim.engine.finetune_loop", "mambamim.engine.finetune"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        fn = getattr(m, "finetune", None)
        if callable(fn):
            return fn
    raise RuntimeError("the fine-tuning engine (mambamim.engine finetune) is not available in this build")


def _read_curve(run: Path) -> tuple[list[float], list[float]]:
    """(steps, training losses) from a run's metrics.csv."""
    path = run / "metrics.csv"
    steps: list[float] = []
    losses: list[float] = []
    if not path.is_file():
        return steps, losses
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            loss = row.get("loss") or row.get("train/loss") or ""
            try:
                s, v = float(row["step"]), float(loss)
            except (KeyError, ValueError):
                continue
            if math.isfinite(v):
                steps.append(s)
                losses.append(v)
    return steps, losses


def run_demo(
    out: str | os.PathLike,
    device: str = "auto",
    settings: DemoSettings | None = None,
    *,
    progress: bool = True,
) -> DemoResult:
    """Run the whole pipeline on synthetic data and write ``OUT/report.md``.

    Args:
        out: output folder (created; earlier demo outputs in it are overwritten).
        device: "auto", "cpu", "cuda", ...
        settings: sizes (default :class:`DemoSettings`); ``DemoSettings.quick()`` for a smoke run.
        progress: show the engines' progress bars.

    Returns:
        A :class:`DemoResult`.
    """
    from mambamim.data.cache import load_case
    from mambamim.data.prepare import prepare_dataset
    from mambamim.data.preprocess import PreprocessParams
    from mambamim.data.synth import synth_dataset
    from mambamim.engine.config import FinetuneConfig, PretrainConfig
    from mambamim.engine.inference import (load_pretrainer, load_segmenter, reconstruct_image,
                                           resolve_device)
    from mambamim.engine.pretrain_loop import pretrain
    from mambamim.evaluation.report import (evaluate_on_cache, labeled_cases, plot_dice_bars, plot_loss_curves,
                                            plot_overlay, write_evaluation)
    from mambamim.evaluation.stats import compare_tables, comparison_markdown, save_comparison

    s = settings or DemoSettings()
    s.validate()
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dev = str(resolve_device(device))
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    def stage(name: str):
        class _Timer:
            def __enter__(self):
                logger.info("demo: %s ...", name)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                seconds[name] = round(time.perf_counter() - self.t, 2)
                if exc[0] is None:
                    logger.info("demo: %s done in %.1f s", name, seconds[name])

        return _Timer()

    # 1. synthetic data: small in-plane matrices at coarse spacing keep every stage quick
    raw = out / "raw"
    with stage("synthetic data"):
        synth_dataset(str(raw), num=s.num_cases, seed=s.seed, inplane_voxels=(56, 72),
                      inplane_spacing=(5.0, 6.0), slice_spacing=(6.0, 8.0))

    # 2. cache
    cache = out / "cache"
    params = PreprocessParams(spacing=(s.spacing,) * 3, min_size=(s.crop,) * 3)
    with stage("prepare"):
        report = prepare_dataset(raw, cache, params, workers=1, progress=progress)
    if report.failed:
        raise RuntimeError(f"demo: {len(report.failed)} synthetic case(s) failed to prepare: {report.failed[:3]}")
    ids = labeled_cases(cache)
    test_ids = ids[-s.num_test:]
    train_ids = ids[: -s.num_test]
    (out / "test_cases.txt").write_text("\n".join(test_ids) + "\n")

    # 3. pre-training on every case (labels unused)
    pre_run = out / "pretrain"
    common = dict(model=s.model, size=s.size, crop=s.crop, batch_size=s.batch_size, num_crops=s.num_crops,
                  device=dev, seed=s.seed, workers=0, progress=progress, log_every=1,
                  overwrite=True)  # documented: a rerun replaces the earlier demo (its runs are moved aside)
    with stage("pre-training"):
        pretrain(PretrainConfig(data=str(cache), out=str(pre_run), mask_ratio=s.mask_ratio,
                                decoder_width=s.decoder_width, steps=s.pretrain_steps,
                                epochs=None, lr=s.lr_pretrain, warmup_steps=max(1, s.pretrain_steps // 10),
                                save_every=0, vis_every=0, **common))

    # 4. fine-tuning from scratch and from the pre-trained encoder on the training cases
    finetune = _finetune_fn()
    runs = {"scratch": out / "finetune_scratch", "pretrained": out / "finetune_pretrained"}
    for name, run in runs.items():
        with stage(f"fine-tuning ({name})"):
            finetune(FinetuneConfig(
                data=str(cache), out=str(run), pretrained=str(pre_run / "encoder.pt") if name == "pretrained" else None,
                iterations=s.finetune_iterations, val_every=0, val_cases=str(out / "test_cases.txt"),
                lr=s.lr_finetune, warmup_steps=max(1, s.finetune_iterations // 10), overlap=0.25, **common))

    # 5. evaluation on the held-out cases
    tables = {}
    evals = {}
    preds: dict[str, np.ndarray] = {}
    show = test_ids[0]
    for name, run in runs.items():
        with stage(f"evaluation ({name})"):
            model, info = load_segmenter(run, dev)

            def keep(cid: str, pred: np.ndarray, case: dict, name: str = name) -> None:
                if cid == show:
                    preds[name] = pred

            table = evaluate_on_cache(model, info, cache, test_ids, overlap=0.25, device=dev, on_case=keep)
            evals[name] = out / f"eval_{name}"
            write_evaluation(table, evals[name], title=f"Evaluation: fine-tuned {name.replace('_', ' ')}")
            tables[name] = table

    # 6. paired comparison
    with stage("compare"):
        shared, results = compare_tables(tables["scratch"], tables["pretrained"])
        save_comparison(results, shared, out / "compare", "scratch", "pretrained")
        comparison_md = comparison_markdown([r for r in results if r.class_name == "mean"] +
                                            [r for r in results if r.metric == "dice" and r.class_name != "mean"],
                                            len(shared), "scratch", "pretrained")

    # 7. figures
    figs: dict[str, Path] = {}
    fig_dir = out / "figures"
    with stage("figures"):
        pretrainer, pinfo = load_pretrainer(pre_run, dev)
        first_image = sorted((raw / "imagesTr").glob("*.nii.gz"))[0]
        # a larger crop than the training one shows more tokens (the networks take any multiple of 16)
        rec = reconstruct_image(pretrainer, pinfo, str(first_image), fig_dir / "reconstruction.png",
                                seed=s.seed, crop=max(s.crop, 64), device=dev)
        figs["reconstruction"] = Path(rec["png"])
        figs["pretrain_loss"] = plot_loss_curves({"MambaMIM pre-training": _read_curve(pre_run)},
                                                 fig_dir / "pretrain_loss.png", "pre-training loss (masked patches)")
        figs["finetune_loss"] = plot_loss_curves({n: _read_curve(r) for n, r in runs.items()},
                                                 fig_dir / "finetune_loss.png", "fine-tuning loss (Dice + CE)")
        figs["dice"] = plot_dice_bars(tables, fig_dir / "dice_per_class.png", "Dice per class (held-out cases)")
        case = load_case(cache, show, mmap=False)
        panels = {"reference": np.asarray(case["label"])}
        panels.update({f"{n} prediction": p for n, p in preds.items()})
        figs["overlay"] = plot_overlay(case["image"], panels, fig_dir / "overlay.png", title=f"case {show}")

    seconds["total"] = round(time.perf_counter() - t_all, 2)
    mean_dice = {n: t.summary()["mean"]["dice"] for n, t in tables.items()}
    report_path = _write_report(out, s, dev, ids, train_ids, test_ids, tables, comparison_md, figs, seconds,
                                rec, mean_dice)
    result = DemoResult(report=report_path, out=out, pretrain_run=pre_run, finetune_runs=runs,
                        evaluations=evals, mean_dice=mean_dice, seconds=seconds, figures=figs)
    write_json_atomic(out / "demo.json", {
        "settings": asdict(s), "device": dev, "seconds": seconds, "mean_dice": mean_dice,
        "train_cases": train_ids, "test_cases": test_ids,
        "torch": torch.__version__, "threads": torch.get_num_threads()})
    return result


def _fmt(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _write_report(out: Path, s: DemoSettings, device: str, ids, train_ids, test_ids, tables, comparison_md: str,
                  figs: dict[str, Path], seconds: dict[str, float], rec: dict, mean_dice: dict) -> Path:
    def rel(p: Path) -> str:
        return os.path.relpath(p, out)

    lines = [
        "# MambaMIM demo on synthetic CT",
        "",
        f"Device `{device}`, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
        f"total {seconds.get('total', 0):.0f} s.",
        "",
        f"{len(ids)} synthetic phantoms (13 BTCV-like organs) resampled to {s.spacing:g} mm; "
        f"a `{s.model}` network of size `{s.size}`, {s.crop}^3 crops. All cases pre-train (labels unused, "
        f"{s.pretrain_steps} steps, mask ratio {s.mask_ratio}); {len(train_ids)} labeled cases fine-tune "
        f"({s.finetune_iterations} iterations) from scratch and from the pre-trained encoder; "
        f"{len(test_ids)} held-out cases ({', '.join(test_ids)}) are evaluated.",
        "",
        "These are toy sizes that show the pipeline working end to end: with so few steps the scores "
        "say nothing about the method.",
        "",
        "## Mean over classes",
        "",
        "| run | Dice | HD95 (mm) | surface Dice |",
        "| --- | --- | --- | --- |",
    ]
    for name, table in tables.items():
        m = table.summary()["mean"]
        lines.append(f"| {name} | {_fmt(m['dice'])} | {_fmt(m['hd95'], 2)} | {_fmt(m['nsd'])} |")
    lines += ["", "## Paired comparison (pretrained vs scratch)", "", comparison_md,
              "## Pre-training", "",
              f"Masked input / reconstruction / original of a {rec['crop']}^3 crop "
              f"({rec['visible']}/{rec['tokens']} tokens visible):", "",
              f"![reconstruction]({rel(figs['reconstruction'])})", "",
              f"![pre-training loss]({rel(figs['pretrain_loss'])})", "",
              "## Fine-tuning", "", f"![fine-tuning loss]({rel(figs['finetune_loss'])})", "",
              "## Evaluation", "", f"![Dice per class]({rel(figs['dice'])})", "",
              f"![overlay]({rel(figs['overlay'])})", ""]
    for name, table in tables.items():
        lines += [table.summary_markdown(f"{name}"), ""]
    lines += ["## Timings", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    lines += ["", "## Files", "",
              "- `pretrain/`: pre-training run (`encoder.pt`, `checkpoints/last.pt`, `metrics.csv`)",
              "- `finetune_scratch/`, `finetune_pretrained/`: fine-tuning runs",
              "- `eval_*/per_case.csv`, `summary.json`, `summary.md`; `compare/comparison.{md,json}`",
              ""]
    return write_text_atomic(out / "report.md", "\n".join(lines))
