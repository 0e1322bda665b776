"""The whole MambaMIM pipeline on synthetic data, small enough for a CPU in minutes.

:func:`run_demo` works in the label-scarce regime where pre-training should pay most: many
unlabelled synthetic CT phantoms and a few labelled ones. It prepares them into one cache,
pre-trains a small HyMamba with MambaMIM on the unlabelled phantoms (and the labelled training
images, labels unused), fine-tunes it twice on the few labelled training cases (from scratch and
from the pre-trained encoder, same seed, same schedule, best checkpoint by validation Dice on
held-out validation cases), evaluates both on held-out test cases, compares them with paired tests
and writes ``OUT/report.md`` that says in words what the numbers show.

Layout of ``OUT``::

    raw/                synthetic phantoms (Decathlon layout: training / validation / test lists)
    cache/              the prepared cache
    pretrain/           the pre-training run (checkpoints, encoder.pt, metrics.csv)
    finetune_scratch/   fine-tuning from random initialisation
    finetune_pretrained/ fine-tuning from the pre-trained encoder
    eval_scratch/, eval_pretrained/   per_case.csv, summary.json, summary.md (test cases)
    compare/            paired comparison (comparison.md, comparison.json)
    figures/            PNGs used by the report
    report.md, demo.json
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mambamim.atomic import write_json_atomic, write_text_atomic
from mambamim.models.registry import PATCH_SIZE

logger = logging.getLogger(__name__)

__all__ = ["DemoSettings", "DemoResult", "run_demo", "verdict"]

ARMS = ("scratch", "pretrained")
# BTCV ids the demo labels: the organs that are several voxels thick at its 6 mm spacing (spleen, kidneys,
# liver, stomach, aorta, inferior vena cava). Esophagus, portal vein, pancreas and adrenals are one to three
# voxels thick there, and the gallbladder was learned by neither arm in the demo's budget (nor at 3 mm in the
# GPU replication); they stay in the images as unlabelled anatomy.
DEMO_ORGANS = (1, 2, 3, 6, 7, 8, 9)
ALL_ORGANS = tuple(range(1, 14))
# Said in every report: the test above is over cases of this one run, not over runs.
ONE_DRAW = ("This is one draw: the test is over the test cases of this run, not over runs. With three labelled "
            "cases and a short schedule, which arm comes out ahead changes with `--seed` (docs/DEMO.md lists five "
            "seeds); `--repeats N` fine-tunes both arms N times and tests over runs, and the GPU replication "
            "(docs/REPLICATION.md, 5 folds) is the evidence for or against pre-training.")


@dataclass
class DemoSettings:
    """Sizes of the demo (defaults: at most 5 minutes on 2 CPU cores; measured figures in the docstring
    of :func:`run_demo`).

    Data: ``num_unlabeled`` phantoms without labels (pre-training only), ``num_train`` labelled cases
    that fine-tune, ``num_val`` labelled cases that pick the best checkpoint and ``num_test`` labelled
    cases that are evaluated and compared. Every phantom is resampled to ``spacing`` mm (coarse, so a
    volume is about 50 voxels a side and a ``crop`` of 32 covers most of the abdomen); ``organs`` are the
    BTCV ids labelled (:data:`DEMO_ORGANS`: those several voxels thick at 6 mm; ``ALL_ORGANS`` for all 13).
    Pre-training: ``pretrain_steps`` steps of ``pretrain_batch`` crops (``pretrain_crops`` per volume)
    at ``lr_pretrain``. Fine-tuning: ``finetune_iterations`` of ``batch_size`` crops (``num_crops``
    per volume) at ``lr_finetune``, validated ``validations`` times. ``repeats`` > 1 fine-tunes and
    evaluates both arms again with the fine-tuning seeds ``seed + 1`` ... (same data, same pre-trained
    encoder) and tests the difference over runs, the unit that varies.
    """

    num_unlabeled: int = 48
    num_train: int = 3
    num_val: int = 2
    num_test: int = 8
    crop: int = 32
    spacing: float = 6.0
    organs: tuple[int, ...] = DEMO_ORGANS
    model: str = "hymamba"
    size: str = "mini"
    mask_ratio: float = 0.75
    decoder_width: int = 64
    pretrain_steps: int = 150
    pretrain_batch: int = 4
    pretrain_crops: int = 2
    lr_pretrain: float = 2e-3
    finetune_iterations: int = 230
    batch_size: int = 4
    num_crops: int = 2
    lr_finetune: float = 3e-3
    validations: int = 5
    overlap: float = 0.25
    seed: int = 0
    repeats: int = 1

    def validate(self) -> None:
        """Raise ValueError on an invalid setting."""
        for name in ("num_train", "num_val", "num_test", "pretrain_steps", "pretrain_batch", "pretrain_crops", "repeats",
                     "finetune_iterations", "batch_size", "num_crops", "validations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_unlabeled < 0:
            raise ValueError(f"num_unlabeled must be >= 0, got {self.num_unlabeled}")
        if self.crop < PATCH_SIZE or self.crop % PATCH_SIZE:
            raise ValueError(f"crop must be a positive multiple of {PATCH_SIZE}, got {self.crop}")
        if self.spacing <= 0:
            raise ValueError(f"spacing must be > 0, got {self.spacing}")
        if self.batch_size % self.num_crops or self.pretrain_batch % self.pretrain_crops:
            raise ValueError("batch sizes count crops and must be multiples of the crops per volume")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        from mambamim.data.synth import organ_lookup

        organ_lookup(self.organs)

    def set_from_text(self, item: str) -> None:
        """Apply ``"name=value"``, the value converted to the field's type; ValueError names bad input."""
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in {f.name for f in fields(self)}:
            raise ValueError(f"--set needs NAME=VALUE with NAME a demo setting ({', '.join(f.name for f in fields(self))}), "
                             f"got {item!r}")
        kind = type(getattr(self, name))
        if kind is tuple:
            text = text.strip()
            self.organs = ALL_ORGANS if text == "all" else tuple(int(v) for v in text.split(",") if v.strip())
            return
        try:
            setattr(self, name, kind(text.strip()))
        except ValueError:
            raise ValueError(f"--set {name}: expected a {kind.__name__}, got {text!r}") from None

    @property
    def num_labeled(self) -> int:
        return self.num_train + self.num_val + self.num_test

    @classmethod
    def quick(cls) -> "DemoSettings":
        """The smallest setting that still runs every stage (for tests)."""
        return cls(num_unlabeled=2, num_train=1, num_val=1, num_test=2, size="tiny", pretrain_steps=2, pretrain_batch=2,
                   pretrain_crops=1, finetune_iterations=2, batch_size=1, num_crops=1, validations=1)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: the report, the runs, the scores and the stage timings (s)."""

    report: Path
    out: Path
    pretrain_run: Path
    finetune_runs: dict[str, Path]
    evaluations: dict[str, Path]
    mean_dice: dict[str, float]
    verdict: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    over_runs: list[dict[str, float]] | None = None  # with repeats > 1: mean Dice of both arms per seed


class _Stage:
    """Context manager that logs a stage and records its wall time in ``seconds[name]``."""

    def __init__(self, name: str, seconds: dict[str, float]) -> None:
        self.name, self.seconds = name, seconds

    def __enter__(self) -> "_Stage":
        logger.info("demo: %s ...", self.name)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds[self.name] = round(time.perf_counter() - self.t, 2)
        if exc[0] is None:
            logger.info("demo: %s done in %.1f s", self.name, self.seconds[self.name])


def make_demo_data(raw: Path, s: DemoSettings) -> dict[str, list[str]]:
    """Write the phantoms as one Decathlon folder whose dataset.json lists the labelled training and
    unlabelled cases under "training", the validation cases under "validation" and the test cases
    (with labels) under "test". Returns the case ids per role."""
    from mambamim.data.synth import synth_dataset

    # small in-plane matrices at coarse spacing keep every stage quick
    kw = dict(inplane_voxels=(56, 72), inplane_spacing=(5.0, 6.0), slice_spacing=(6.0, 8.0),
              workers=min(2, os.cpu_count() or 1))
    labeled = synth_dataset(str(raw), num=s.num_labeled, seed=s.seed, prefix="lab", organs=s.organs, **kw)
    entries = labeled["training"]
    unlabeled = []
    if s.num_unlabeled:
        unlabeled = synth_dataset(str(raw), num=s.num_unlabeled, seed=s.seed + 1, prefix="unlab", unlabeled=True,
                                  **kw)["training"]
    n_tr, n_val = s.num_train, s.num_val
    meta = {**labeled, "training": entries[:n_tr] + unlabeled, "validation": entries[n_tr:n_tr + n_val],
            "test": entries[n_tr + n_val:], "numTraining": n_tr + len(unlabeled), "numTest": s.num_test}
    meta.pop("synthetic", None)
    write_json_atomic(raw / "dataset.json", meta, indent=1)

    def ids(items: list[dict]) -> list[str]:
        return [Path(e["image"]).name.removesuffix(".nii.gz") for e in items]

    return {"train": ids(meta["training"][:n_tr]), "val": ids(meta["validation"]), "test": ids(meta["test"]),
            "unlabeled": ids(unlabeled)}


def _common(s: DemoSettings, device: str, progress: bool) -> dict[str, Any]:
    # overwrite: documented, a rerun replaces the earlier demo (its runs are moved aside)
    return dict(model=s.model, size=s.size, crop=s.crop, device=device, seed=s.seed, workers=0,
                progress=progress, overwrite=True)


def _pretrain(cache: Path, run: Path, cases: list[str], s: DemoSettings, common: dict[str, Any]) -> None:
    from mambamim.engine.config import PretrainConfig
    from mambamim.engine.pretrain_loop import pretrain

    pretrain(PretrainConfig(
        data=str(cache), out=str(run), cases=cases, mask_ratio=s.mask_ratio, decoder_width=s.decoder_width,
        steps=s.pretrain_steps, epochs=None, batch_size=s.pretrain_batch, num_crops=s.pretrain_crops,
        lr=s.lr_pretrain, warmup_steps=max(1, s.pretrain_steps // 10), save_every=0, vis_every=0,
        log_every=max(1, s.pretrain_steps // 50), **common))


def _finetune(cache: Path, run: Path, encoder: Path | None, s: DemoSettings, common: dict[str, Any]) -> None:
    from mambamim.engine.config import FinetuneConfig
    from mambamim.engine.finetune_loop import finetune

    # validation cases come from the cache's "validation" list; test cases never train
    finetune(FinetuneConfig(
        data=str(cache), out=str(run), pretrained=str(encoder) if encoder else None,
        iterations=s.finetune_iterations, val_every=max(1, s.finetune_iterations // s.validations),
        batch_size=s.batch_size, num_crops=s.num_crops, lr=s.lr_finetune,
        warmup_steps=max(1, s.finetune_iterations // 10), overlap=s.overlap,
        log_every=max(1, s.finetune_iterations // 50), **common))


def _read_rows(run: Path) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_curve(run: Path, column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one column of a run's metrics.csv, rows where it is a finite number."""
    steps: list[float] = []
    values: list[float] = []
    for row in _read_rows(run):
        try:
            step, value = float(row["step"]), float(row.get(column) or "nan")
        except (KeyError, ValueError):
            continue
        if math.isfinite(value):
            steps.append(step)
            values.append(value)
    return steps, values


def verdict(results: list[Any], a: str = "scratch", b: str = "pretrained", alpha: float = 0.05) -> str:
    """One paragraph in words on the per-case mean Dice of ``b`` against ``a`` (paired Wilcoxon).

    Args:
        results: :class:`mambamim.evaluation.stats.PairedResult` rows; the one with class ``mean``
            and metric ``dice`` is used.
    """
    row = next((r for r in results if r.class_name == "mean" and r.metric == "dice"), None)
    if row is None or row.n < 2:
        return "Too few paired test cases to compare the two runs."
    diff, p = row.mean_diff, row.p_wilcoxon
    floor = 2.0 / 2 ** row.n  # the smallest two-sided Wilcoxon p-value n pairs can give
    head = (f"Over {row.n} held-out test cases, mean Dice is {row.mean_b:.3f} {b} against {row.mean_a:.3f} "
            f"{a} (difference {diff:+.3f}; paired Wilcoxon p = {p:.3g}, paired t-test p = {row.p_ttest:.3g}).")
    if math.isfinite(p) and p < alpha:
        better = b if diff > 0 else a
        words = f" The difference is significant at alpha = {alpha:g}: {better} is better on these cases."
    else:
        words = (f" There is no significant difference at alpha = {alpha:g}"
                 + (f" (with {row.n} cases the Wilcoxon test cannot go below p = {floor:.3g})" if floor >= alpha
                    else "") + ": these numbers do not show that one run is better than the other.")
    return head + words


def _evaluate_arms(cache: Path, runs: dict[str, Path], test_ids: list[str], out: Path, s: DemoSettings, device: str,
                   seconds: dict[str, float], tag: str = "") -> tuple[dict[str, Any], dict[str, Path], dict[str, np.ndarray]]:
    from mambamim.engine.inference import load_segmenter
    from mambamim.evaluation.report import evaluate_on_cache, write_evaluation

    tables, evals, preds = {}, {}, {}
    for name, run in runs.items():
        with _Stage(f"evaluation ({name}{tag})", seconds):
            model, info = load_segmenter(run, device)

            def keep(cid: str, pred: np.ndarray, case: dict, name: str = name) -> None:
                if cid == test_ids[0]:
                    preds[name] = pred

            table = evaluate_on_cache(model, info, cache, test_ids, overlap=s.overlap, device=device, on_case=keep,
                                      nsd_tolerance_mm=s.spacing)
            evals[name] = out / f"eval_{name}"
            write_evaluation(table, evals[name], title=f"Evaluation on the test cases: fine-tuned {name}")
            tables[name] = table
    return tables, evals, preds


def _repeat_runs(cache: Path, out: Path, pre_run: Path, test_ids: list[str], s: DemoSettings, device: str,
                 progress: bool, seconds: dict[str, float], first: dict[str, float]) -> list[dict[str, float]]:
    """Mean test Dice of both arms per fine-tuning seed: ``first`` (seed ``s.seed``, already run), then
    ``s.repeats - 1`` more pairs under ``OUT/repeats/seed<N>/``."""
    rows = [{"seed": s.seed, **first}]
    for k in range(1, s.repeats):
        seed, folder = s.seed + k, out / "repeats" / f"seed{s.seed + k}"
        common = {**_common(s, device, progress), "seed": seed}
        runs = {name: folder / f"finetune_{name}" for name in ARMS}
        for name, run in runs.items():
            with _Stage(f"fine-tuning ({name}, seed {seed})", seconds):
                _finetune(cache, run, pre_run / "encoder.pt" if name == "pretrained" else None, s, common)
        tables, _, _ = _evaluate_arms(cache, runs, test_ids, folder, s, device, seconds, tag=f", seed {seed}")
        rows.append({"seed": seed, **{n: t.summary()["mean"]["dice"] for n, t in tables.items()}})
    return rows


def verdict_over_runs(rows: list[dict[str, float]], a: str = "scratch", b: str = "pretrained",
                      alpha: float = 0.05) -> str:
    """One paragraph in words on the mean test Dice of ``b`` against ``a`` over paired fine-tuning runs
    (``rows``: one ``{"seed", a, b}`` per run pair)."""
    from mambamim.evaluation.stats import paired_tests

    xa, xb = [r[a] for r in rows], [r[b] for r in rows]
    n, diff = len(rows), float(np.mean(xb) - np.mean(xa))
    p_t, p_w = paired_tests(xa, xb)
    ahead = sum(y > x for x, y in zip(xa, xb))
    head = (f"Over {n} fine-tuning runs of each arm (seeds {rows[0]['seed']}-{rows[-1]['seed']}), mean test Dice is "
            f"{np.mean(xb):.3f} {b} against {np.mean(xa):.3f} {a} (difference {diff:+.3f}, {b} ahead in {ahead} of "
            f"{n} runs; paired Wilcoxon p = {p_w:.3g}, paired t-test p = {p_t:.3g}).")
    if math.isfinite(p_w) and p_w < alpha:
        return head + f" Over runs, {b if diff > 0 else a} is significantly better at alpha = {alpha:g}."
    floor = 2.0 / 2 ** n
    return head + (f" No significant difference over runs at alpha = {alpha:g}"
                   + (f" ({n} runs cannot give a Wilcoxon p below {floor:.3g})" if floor >= alpha else "") + ".")


def _plot_finetune(runs: dict[str, Path], out_png: Path) -> Path:
    """Fine-tuning loss and validation mean Dice against iteration, one line per run."""
    from mambamim.evaluation.report import plot_curve_panels

    panels = [(title, ylabel, {name: read_curve(run, column) for name, run in runs.items()})
              for column, ylabel, title in (("loss", "Dice + CE loss", "fine-tuning loss"),
                                            ("val_mean_dice", "mean Dice", "validation mean Dice"))]
    return plot_curve_panels(panels, out_png, xlabel="iteration")


def _figures(out: Path, pre_run: Path, runs: dict[str, Path], tables: dict[str, Any], preds: dict[str, np.ndarray],
             cache: Path, show: str, image: Path, s: DemoSettings, device: str) -> tuple[dict[str, Path], dict]:
    from mambamim.data.cache import load_case
    from mambamim.engine.inference import load_pretrainer
    from mambamim.inference import reconstruct_image
    from mambamim.evaluation.report import plot_dice_bars, plot_loss_curves, plot_overlay

    fig_dir = out / "figures"
    figs: dict[str, Path] = {}
    pretrainer, pinfo = load_pretrainer(pre_run, device)
    # a larger crop than the training one shows more tokens (the networks take any multiple of 16)
    rec = reconstruct_image(pretrainer, pinfo, str(image), fig_dir / "reconstruction.png", seed=s.seed,
                            crop=max(s.crop, 64), device=device)
    figs["reconstruction"] = Path(rec["png"])
    figs["pretrain_loss"] = plot_loss_curves({"MambaMIM pre-training": read_curve(pre_run, "loss")},
                                             fig_dir / "pretrain_loss.png",
                                             "pre-training loss (MSE on masked patches, per-patch normalised)")
    figs["finetune"] = _plot_finetune(runs, fig_dir / "finetune.png")
    figs["dice"] = plot_dice_bars(tables, fig_dir / "dice_per_class.png", "Dice per class on the test cases")
    case = load_case(cache, show, mmap=False)
    panels = {"reference": np.asarray(case["label"]), **{f"{n} prediction": p for n, p in preds.items()}}
    figs["overlay"] = plot_overlay(case["image"], panels, fig_dir / "overlay.png", title=f"test case {show}",
                                   class_names=["background", *next(iter(tables.values())).class_names])
    return figs, rec


def run_demo(out: str | os.PathLike, device: str = "auto", settings: DemoSettings | None = None, *,
             progress: bool = True) -> DemoResult:
    """Run the whole pipeline on synthetic data and write ``OUT/report.md``.

    Args:
        out: output folder (created; earlier demo outputs in it are replaced, earlier runs moved aside).
        device: "auto", "cpu", "cuda", ...
        settings: sizes (default :class:`DemoSettings`); ``DemoSettings.quick()`` for a smoke run.
        progress: show the engines' progress bars.
    """
    from mambamim.data.prepare import prepare_dataset
    from mambamim.data.preprocess import PreprocessParams
    from mambamim.runtime.device import resolve_device
    from mambamim.evaluation.stats import compare_tables, save_comparison

    s = settings or DemoSettings()
    s.validate()
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dev = str(resolve_device(device))
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    raw, cache = out / "raw", out / "cache"
    with _Stage("synthetic data", seconds):
        ids = make_demo_data(raw, s)
    write_text_atomic(out / "test_cases.txt", "\n".join(ids["test"]) + "\n")
    with _Stage("prepare", seconds):
        report = prepare_dataset(raw, cache, PreprocessParams(spacing=(s.spacing,) * 3, min_size=(s.crop,) * 3),
                                 workers=1, progress=progress)
    if report.failed:
        raise RuntimeError(f"demo: {len(report.failed)} synthetic case(s) failed to prepare: {report.failed[:3]}")
    common = _common(s, dev, progress)
    pre_run = out / "pretrain"
    with _Stage("pre-training", seconds):
        _pretrain(cache, pre_run, ids["unlabeled"] + ids["train"], s, common)
    runs = {name: out / f"finetune_{name}" for name in ARMS}
    for name, run in runs.items():
        with _Stage(f"fine-tuning ({name})", seconds):
            _finetune(cache, run, pre_run / "encoder.pt" if name == "pretrained" else None, s, common)
    tables, evals, preds = _evaluate_arms(cache, runs, ids["test"], out, s, dev, seconds)
    with _Stage("compare", seconds):
        shared, results = compare_tables(tables["scratch"], tables["pretrained"])
        save_comparison(results, shared, out / "compare", "scratch", "pretrained")
    with _Stage("figures", seconds):
        figs, rec = _figures(out, pre_run, runs, tables, preds, cache, ids["test"][0],
                             raw / "imagesTr" / f"{ids['test'][0]}.nii.gz", s, dev)
    mean_dice = {n: t.summary()["mean"]["dice"] for n, t in tables.items()}
    over_runs = _repeat_runs(cache, out, pre_run, ids["test"], s, dev, progress, seconds, mean_dice) \
        if s.repeats > 1 else None
    seconds["total"] = round(time.perf_counter() - t_all, 2)
    text = verdict(results) + (" " + verdict_over_runs(over_runs) if over_runs else "")
    report_path = _write_report(out, s, dev, ids, tables, results, shared, text, figs, seconds, rec, runs, pre_run,
                                over_runs)
    write_json_atomic(out / "demo.json", {
        "settings": asdict(s), "device": dev, "seconds": seconds, "mean_dice": mean_dice, "verdict": text,
        "over_runs": over_runs,
        "cases": ids, "torch": torch.__version__, "threads": torch.get_num_threads()})
    return DemoResult(report=report_path, out=out, pretrain_run=pre_run, finetune_runs=runs, evaluations=evals,
                      mean_dice=mean_dice, verdict=text, seconds=seconds, figures=figs, over_runs=over_runs)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _class_table(tables: dict[str, Any], results: list[Any]) -> list[str]:
    """Markdown: per-class test Dice of each arm with the paired Wilcoxon p-value."""
    p = {r.class_name: r for r in results if r.metric == "dice"}
    names = list(next(iter(tables.values())).class_names)
    lines = ["| class | " + " | ".join(f"Dice {n}" for n in tables) + " | difference | Wilcoxon p |",
             "| --- |" + " ---: |" * (len(tables) + 2)]
    for name in names + ["mean"]:
        cells = []
        for table in tables.values():
            summary = table.summary()
            cells.append(_fmt(summary["mean"]["dice"] if name == "mean" else summary["classes"][name]["dice_mean"]))
        r = p.get(name)
        label = "**mean over classes**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(r.mean_diff if r else None):s} | "
                     f"{_fmt(r.p_wilcoxon if r else None, 3)} |")
    return lines


def _pretrain_summary(pre_run: Path) -> str:
    steps, losses = read_curve(pre_run, "loss")
    if len(losses) < 4:
        return ""
    k = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    return (f"The reconstruction loss fell from {first:.3f} (first {k} logged steps) to {last:.3f} (last {k}), "
            f"{100 * (1 - last / first):.0f} % lower (a loss of 1.0 is what predicting each masked patch's mean gives).")


def _write_report(out: Path, s: DemoSettings, device: str, ids: dict[str, list[str]], tables: dict[str, Any],
                  results: list[Any], shared: list[str], text: str, figs: dict[str, Path],
                  seconds: dict[str, float], rec: dict, runs: dict[str, Path], pre_run: Path,
                  over_runs: list[dict[str, float]] | None = None) -> Path:
    def rel(p: Path) -> str:
        return os.path.relpath(p, out)

    load = json.loads((runs["pretrained"] / "encoder_load_report.json").read_text())
    best = {n: _best(run) for n, run in runs.items()}
    lines = [
        "# MambaMIM demo on synthetic CT", "",
        f"Device `{device}`, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
        f"total {seconds.get('total', 0):.0f} s.", "",
        "## What was run", "",
        f"- {len(ids['unlabeled'])} unlabelled and {s.num_labeled} labelled synthetic CT phantoms, resampled to "
        f"{s.spacing:g} mm, {len(s.organs)} organs labelled ({', '.join(_organ_names(s.organs))}; the other BTCV "
        f"organs stay in the images unlabelled); a `{s.model}` network of size `{s.size}`, {s.crop}^3 crops.",
        f"- Pre-training (MambaMIM, mask ratio {s.mask_ratio}, {s.pretrain_steps} steps of {s.pretrain_batch} crops) "
        f"on the {len(ids['unlabeled'])} unlabelled phantoms and the {len(ids['train'])} labelled training images "
        "(labels unused). " + _pretrain_summary(pre_run),
        f"- Fine-tuning on only {len(ids['train'])} labelled cases ({', '.join(ids['train'])}), {s.finetune_iterations} "
        f"iterations, twice with the same seed and schedule: from scratch and from the pre-trained encoder "
        f"({load.get('summary', 'encoder loaded')}). The checkpoint kept (best.pt) is the best by mean Dice on "
        f"{len(ids['val'])} validation cases ({', '.join(ids['val'])}): iteration {best['scratch']} from scratch, "
        f"{best['pretrained']} pre-trained.",
        f"- Evaluation on {len(ids['test'])} held-out test cases ({', '.join(ids['test'])}), sliding window "
        f"(overlap {s.overlap}).", "",
        "## Result", "", text, "", _missed(tables, s.finetune_iterations), "",
    ]
    lines += _runs_table(over_runs) if over_runs else [ONE_DRAW, ""]
    lines += _class_table(tables, results)
    lines += ["", "Mean over classes with HD95 and surface Dice:", "",
              "| run | Dice | HD95 (mm) | surface Dice |", "| --- | ---: | ---: | ---: |"]
    for name, table in tables.items():
        m = table.summary()["mean"]
        lines.append(f"| {name} | {_fmt(m['dice'])} | {_fmt(m['hd95'], 1)} | {_fmt(m['nsd'])} |")
    lines += ["", f"![Dice per class]({rel(figs['dice'])})", "", f"![overlay]({rel(figs['overlay'])})", "",
              "## Pre-training", "",
              f"Input, masked input, reconstruction and target of a {rec['crop']}^3 crop of a test image "
              f"({rec['visible']}/{rec['tokens']} tokens visible):", "",
              f"![reconstruction]({rel(figs['reconstruction'])})", "", f"![pre-training loss]({rel(figs['pretrain_loss'])})",
              "", "## Fine-tuning", "", f"![fine-tuning]({rel(figs['finetune'])})", "",
              "Toy sizes: this shows the pipeline and the comparison working; the GPU replication in "
              "docs/REPLICATION.md is the evidence at scale.", "",
              "## Timings", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    lines += ["", "## Files", "",
              "- `pretrain/`: pre-training run (`encoder.pt`, `checkpoints/last.pt`, `metrics.csv`)",
              "- `finetune_scratch/`, `finetune_pretrained/`: fine-tuning runs (`checkpoints/best.pt`, `metrics.csv`)",
              "- `eval_*/per_case.csv`, `summary.json`, `summary.md`; `compare/comparison.{md,json}`", ""]
    return write_text_atomic(out / "report.md", "\n".join(lines))


def _runs_table(rows: list[dict[str, float]]) -> list[str]:
    """Markdown lines: mean test Dice of both arms per fine-tuning seed (the first run is the one above)."""
    lines = ["The per-case test is over the first run's cases; the test over runs (last sentence above) is the one "
             "that speaks for pre-training. Mean test Dice per fine-tuning seed:", "",
             "| fine-tuning seed | scratch | pretrained | difference |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['seed']} | {r['scratch']:.3f} | {r['pretrained']:.3f} | {r['pretrained'] - r['scratch']:+.3f} |"
              for r in rows]
    return lines + [""]


def _organ_names(organs: tuple[int, ...]) -> list[str]:
    from mambamim.data.synth import BTCV_LABELS

    return [BTCV_LABELS[int(o)] for o in organs]


def _missed(tables: dict[str, Any], iterations: int) -> str:
    """Which organs each run never segments on the test cases: what a short budget leaves unlearned."""
    parts, missed = [], False
    for name, table in tables.items():
        classes = table.summary()["classes"]
        zero = [c.replace("_", " ") for c, v in classes.items() if v["dice_mean"] is not None and v["dice_mean"] < 0.01]
        missed |= bool(zero)
        parts.append(f"{name}: {', '.join(zero) if zero else 'none'}")
    text = (f"Organs a run does not segment at all after {iterations} iterations (mean test Dice below 0.01): "
            + "; ".join(parts) + ".")
    if missed:
        text += (" While organs are still missing, the comparison measures how fast fine-tuning gets going from "
                 "each start, not where longer training ends: docs/DEMO.md shows both runs with more iterations.")
    return text


def _best(run: Path) -> str:
    steps, dice = read_curve(run, "val_mean_dice")
    if not dice:
        return "n/a (no validation)"
    k = int(np.argmax(dice))
    return f"{int(steps[k])} (validation Dice {dice[k]:.3f})"
