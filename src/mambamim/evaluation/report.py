"""Evaluating a checkpoint on a cache, writing the results, and the figures of the demo report.

Scores are computed in cache space (RAS, the checkpoint's preprocessing spacing), where the
network predicts and the reference labels were resampled with nearest neighbour; HD95 and the
surface-Dice tolerance are in mm of that grid.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mambamim.atomic import atomic_write, write_json_atomic, write_text_atomic
from mambamim.evaluation.metrics import MetricTable, case_metrics, column_name, default_nsd_tolerance

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from mambamim.inference.sliding_window import WindowOptions

logger = logging.getLogger(__name__)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def cache_spacing(meta: dict) -> tuple[float, float, float]:
    """Voxel size in mm of a cached case (from its cache affine)."""
    aff = np.asarray(meta["cache"]["affine"], dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def cache_nsd_tolerance(cache_dir: str | os.PathLike) -> float:
    """The default surface-Dice tolerance of a cache in mm: its mean voxel size (the preprocessing
    spacing of its dataset.json, else the first case's grid), e.g. 6 mm voxels -> 6 mm."""
    from mambamim.data.cache import read_cache_index

    index = read_cache_index(cache_dir, allow_empty=True)
    spacing = (index.get("preprocessing") or {}).get("spacing")
    if spacing is not None:
        spacing = [spacing] if isinstance(spacing, (int, float)) else list(spacing)
        return default_nsd_tolerance(spacing)
    from mambamim.data.cache import load_case

    cases = index.get("cases") or []
    if not cases:
        raise ValueError(f"cache {cache_dir} has no case to take the voxel spacing from")
    return default_nsd_tolerance(cache_spacing(load_case(cache_dir, cases[0]["id"], mmap=True)["meta"]))


def labeled_cases(cache_dir: str | os.PathLike, split: str | None = None,
                  case_ids: Sequence[str] | None = None) -> list[str]:
    """Ids of the cache's cases that have a label (optionally of one ``split`` or in ``case_ids``)."""
    from mambamim.data.cache import read_cache_index

    index = read_cache_index(cache_dir, allow_empty=True)
    ids = [c["id"] for c in index["cases"] if c.get("label")
           and (split is None or c.get("split") == split)]
    if case_ids is not None:
        wanted = set(case_ids)
        unknown = sorted(wanted - {c["id"] for c in index["cases"]})
        if unknown:
            raise ValueError(f"case(s) not in cache {cache_dir}: {', '.join(unknown[:10])}")
        ids = [c for c in ids if c in wanted]
    return ids


def case_dice(pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, labels: Iterable[int]) -> list[float]:
    """Dice per class of one case: the numbers :func:`mambamim.evaluation.metrics.case_metrics` gives
    (same conventions, same MONAI computation) without its costly surface metrics, on the tensors'
    device. The fine-tuning validation scores with it, so its Dice is ``mambamim evaluate``'s.

    Args:
        pred, gt: integer label maps (X, Y, Z), same shape (``gt`` is moved to ``pred``'s device).
        labels: the label values to score.

    Returns:
        Dice per label: NaN where neither map has the label, 0 where only one has it.
    """
    from monai.metrics import compute_dice

    pred = torch.as_tensor(pred)
    gt = torch.as_tensor(gt, device=pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and reference differ in shape: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    out: list[float] = []
    for c in labels:
        p, g = pred == c, gt == c
        has_p, has_g = bool(p.any()), bool(g.any())
        if not has_p and not has_g:
            out.append(math.nan)
        elif has_p != has_g:
            out.append(0.0)
        else:
            # case_metrics crops to the box of p | g first: the voxel counts, hence the Dice, are the same
            dice = compute_dice(p[None, None].float(), g[None, None].float(), include_background=True,
                                ignore_empty=False)
            out.append(float(dice.item()))
    return out


def evaluate_on_cache(
    model: nn.Module,
    info: dict[str, Any],
    cache_dir: str | os.PathLike,
    case_ids: Sequence[str] | None = None,
    *,
    nsd_tolerance_mm: float | None = None,
    progress: bool = False,
    on_case: Callable[[str, np.ndarray, dict], None] | None = None,
    **window: Unpack[WindowOptions],
) -> MetricTable:
    """Sliding-window predict and score every labeled case of a cache.

    Args:
        model, info: a segmentation network and its info (``class_names`` indexed by label value,
            ``roi_size``), e.g. from :func:`mambamim.engine.inference.load_segmenter`.
        cache_dir: a prepared cache.
        case_ids: cases to score; default every labeled case.
        window: ``roi`` (default: the checkpoint's), ``overlap``, ``sw_batch_size``, ``tta_flips``,
            ``device``, ``amp``: see :func:`mambamim.inference.predict_volume` and
            :class:`mambamim.inference.WindowOptions`.
        nsd_tolerance_mm: surface-Dice tolerance in mm; None: the cache's mean voxel size
            (:func:`cache_nsd_tolerance`). The table records it (``table.nsd_tolerance_mm``).
        progress: show a tqdm bar.
        on_case: called as ``on_case(case_id, prediction (X, Y, Z) int64, case dict)`` after each case.

    Returns:
        A :class:`MetricTable` over classes ``1 .. num_classes - 1``.
    """
    from mambamim.data.cache import load_case
    from mambamim.inference.sliding_window import predict_labels

    ids = list(case_ids) if case_ids is not None else labeled_cases(cache_dir)
    if not ids:
        raise ValueError(f"no labeled case to evaluate in {cache_dir}")
    names = list(info.get("class_names") or [])
    if len(names) < 2:
        raise ValueError("the checkpoint declares fewer than two classes; nothing to score")
    fg_names = names[1:]
    cols = [column_name(n) for n in fg_names]
    if len(set(cols)) != len(cols) or "mean" in cols:
        fg_names = [f"{i}_{n}" for i, n in enumerate(fg_names, start=1)]
    labels = list(range(1, len(names)))
    if nsd_tolerance_mm is None:
        nsd_tolerance_mm = cache_nsd_tolerance(cache_dir)
    table = MetricTable(class_names=fg_names, nsd_tolerance_mm=float(nsd_tolerance_mm))
    iterator: Any = ids
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(ids, desc="evaluate", unit="case")
    for cid in iterator:
        case = load_case(cache_dir, cid, mmap=False)
        if case["label"] is None:
            raise ValueError(f"case {cid!r} of {cache_dir} has no label")
        image = torch.from_numpy(np.ascontiguousarray(case["image"], dtype=np.float32))
        pred = predict_labels(model, info, image, **window)
        gt = np.asarray(case["label"]).astype(np.int64)
        spacing = cache_spacing(case["meta"])
        extra = sorted(set(np.unique(gt).tolist()) - set(range(len(names))))
        if extra:
            logger.warning("case %s: reference label values %s are not classes of the model; ignored", cid, extra)
        scores = case_metrics(pred, gt, spacing, labels, nsd_tolerance_mm=nsd_tolerance_mm)
        row = table.add_case(cid, {n: scores[c] for n, c in zip(fg_names, labels)})
        logger.info("%s: mean Dice %.4f", cid, row["dice_mean"])
        if on_case is not None:
            on_case(cid, pred, case)
    return table


def write_evaluation(table: MetricTable, out_dir: str | os.PathLike, title: str = "Evaluation",
                     extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``per_case.csv``, ``summary.json`` (NaN as null, inf as "inf") and ``summary.md`` into ``out_dir``.

    Returns:
        ``{"per_case": path, "summary_json": path, "summary_md": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_case": out / "per_case.csv", "summary_json": out / "summary.json", "summary_md": out / "summary.md"}
    table.to_csv(paths["per_case"])
    summary = table.summary()
    if extra:
        summary = {**extra, **summary}
    write_json_atomic(paths["summary_json"], _json_safe(summary))
    write_text_atomic(paths["summary_md"], table.summary_markdown(title))
    return paths


# ----------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save_png(fig, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", bbox_inches="tight")
    return path


def plot_loss_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], out_png: str | os.PathLike,
                     title: str = "training loss") -> Path:
    """Line plot of one or more loss curves: ``{label: (steps, losses)}``. Returns the PNG path."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for label, (steps, losses) in curves.items():
        if len(steps):
            ax.plot(list(steps), list(losses), label=label, marker="." if len(steps) < 40 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    return _save_png(fig, out_png)


def plot_curve_panels(panels: Sequence[tuple[str, str, dict[str, tuple[Sequence[float], Sequence[float]]]]],
                      out_png: str | os.PathLike, xlabel: str = "step", title: str | None = None) -> Path:
    """Side-by-side line plots: each panel is ``(title, ylabel, {label: (x, y)})``. Returns the PNG path."""
    fig = _figure(5.0 * max(1, len(panels)), 3.6)
    for k, (panel_title, ylabel, curves) in enumerate(panels):
        ax = fig.add_subplot(1, max(1, len(panels)), k + 1)
        for label, (x, y) in curves.items():
            if len(x):
                ax.plot(list(x), list(y), label=label, marker="o" if len(x) < 20 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend()
    if title:
        fig.suptitle(title)
    return _save_png(fig, out_png)


def plot_dice_bars(tables: dict[str, MetricTable], out_png: str | os.PathLike,
                   title: str = "Dice per class") -> Path:
    """Grouped bar chart of the per-class mean Dice of one or more evaluations. Returns the PNG path."""
    names = list(next(iter(tables.values())).class_names) if tables else []
    fig = _figure(max(5.0, 0.6 * len(names) * max(1, len(tables)) + 2), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(tables))
    x = np.arange(len(names))
    for k, (label, table) in enumerate(tables.items()):
        s = table.summary()["classes"]
        means = [s[n]["dice_mean"] if n in s and not math.isnan(s[n]["dice_mean"]) else 0.0 for n in names]
        stds = [s[n]["dice_std"] if n in s and not math.isnan(s[n]["dice_std"]) else 0.0 for n in names]
        ax.bar(x + (k - (len(tables) - 1) / 2) * width, means, width, yerr=stds, label=label, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if tables:
        ax.legend()
    return _save_png(fig, out_png)


def plot_overlay(image: np.ndarray, labels: dict[str, np.ndarray], out_png: str | os.PathLike,
                 z: int | None = None, title: str | None = None,
                 class_names: Sequence[str] | dict[int, str] | None = None, panel_inches: float = 4.5) -> Path:
    """Axial slice of ``image`` (X, Y, Z) with label maps (X, Y, Z) drawn as coloured overlays,
    one titled panel per entry of ``labels`` (e.g. reference and prediction), and a legend of the
    class colours. Returns the PNG path.

    Args:
        image: (X, Y, Z) or (C, X, Y, Z) intensities in [0, 1] (the first channel is shown).
        labels: ``{panel title: integer label map (X, Y, Z)}``.
        z: the slice; default the one with most foreground in the first label map.
        title: figure title.
        class_names: names by label value (a list indexed by value, background 0 included, or a
            dict); default ``class <value>``.
        panel_inches: width of each panel in inches (at 100 dpi: 450 pixels by default).
    """
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    if panel_inches < 1:
        raise ValueError(f"panel_inches must be >= 1, got {panel_inches}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 4:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z) or (C, X, Y, Z), got {image.shape}")
    if z is None:
        # the slice with most foreground in the first label map, else the centre
        first = next(iter(labels.values()), None)
        fg = (np.asarray(first) > 0).sum(axis=(0, 1)) if first is not None else None
        z = int(fg.argmax()) if fg is not None and fg.max() > 0 else image.shape[2] // 2
    if isinstance(class_names, dict):
        names = {int(k): str(v) for k, v in class_names.items()}
    else:
        names = {i: str(v) for i, v in enumerate(class_names or [])}
    top = max(1, max((int(np.asarray(v).max()) for v in labels.values()), default=1), max(names, default=0))
    # one fixed colour per label value (1 .. top), the same in every panel and in the legend
    base = colormaps["tab20"] if top > 10 else colormaps["tab10"]
    colours = [base(i % base.N) for i in range(top)]
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(0.5, top + 1.5), cmap.N)
    n = max(1, len(labels))
    nx, ny = image.shape[0], image.shape[1]
    height = panel_inches * max(0.5, min(2.0, ny / max(nx, 1)))
    fig = _figure(panel_inches * n, height + 1.2)
    present: set[int] = set()
    for k, (name, lab) in enumerate(labels.items() or [("image", None)]):
        ax = fig.add_subplot(1, n, k + 1)
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        if lab is not None:
            sl = np.asarray(lab)[:, :, z].T.astype(np.int64)
            present.update(int(v) for v in np.unique(sl) if v > 0)
            ax.imshow(np.ma.masked_where(sl == 0, sl), cmap=cmap, norm=norm, origin="lower", alpha=0.5,
                      interpolation="nearest")
        ax.set_title(f"{name} (axial slice z={z})", fontsize=11)
        ax.axis("off")
    shown = sorted(present) or sorted(v for v in names if v > 0)
    if shown:
        handles = [Patch(facecolor=colours[v - 1], edgecolor="none", alpha=0.7, label=names.get(v, f"class {v}"))
                   for v in shown if v <= top]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=10, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=12)
    legend_rows = (len(shown) - 1) // 6 + 1 if shown else 0
    total_h = height + 1.2
    fig.subplots_adjust(left=0.01, right=0.99, wspace=0.04, top=1 - 0.6 / total_h,
                        bottom=(0.1 + 0.3 * legend_rows) / total_h)
    return _save_png(fig, out_png)
