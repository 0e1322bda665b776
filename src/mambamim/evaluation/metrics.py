"""Per-case, per-class segmentation metrics: Dice, HD95 (mm) and surface Dice (NSD).

The numbers come from MONAI (:func:`monai.metrics.compute_dice`,
:func:`monai.metrics.compute_hausdorff_distance` with ``percentile=95`` and the
voxel spacing, :func:`monai.metrics.compute_surface_dice`). Each class is scored
as a binary problem on the bounding box of ``pred | gt`` (grown by one voxel), which
leaves every metric unchanged and keeps memory at one class at a time.

Conventions for empty structures (``gt`` or ``pred`` without a voxel of a class):

=====================  ==========  ===========================  ==============
case                   Dice        HD95                         surface Dice
=====================  ==========  ===========================  ==============
both empty             NaN         NaN                          NaN
one empty              0           volume diagonal in mm [*]    0
=====================  ==========  ===========================  ==============

NaN means "not scored": a class absent from both the reference and the prediction
is correct but tells nothing, so it is left out of every mean instead of inflating
it with a 1 (``both_empty="one"`` gives the other common convention). A class
missed completely or hallucinated is a failure, so its HD95 takes the worst value
the image allows, the length of its diagonal in mm (the BraTS convention), which
keeps means and paired tests finite; ``hd95_one_empty="inf"`` or ``"nan"`` selects
the alternatives.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from mambamim.atomic import atomic_write

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("dice", "hd95", "nsd")
"""Metric names, also the column prefixes of ``per_case.csv`` (``dice_<class>``)."""


def column_name(class_name: str) -> str:
    """A class name as it appears in ``per_case.csv`` column names: runs of spaces and other
    characters outside letters, digits, ``_``, ``-`` and ``.`` become one ``_``
    (``"right kidney"`` -> ``"right_kidney"``)."""
    return re.sub(r"[^\w.\-]+", "_", str(class_name).strip()) or "_"

BothEmpty = Literal["nan", "one"]
Hd95OneEmpty = Literal["diagonal", "inf", "nan"]


def _bbox_crop(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop two same-shaped bool segmentations to the bounding box of their union grown by 1 voxel."""
    union = pred | gt
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        lo, hi = max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])
        slices.append(slice(lo, hi))
    sl = tuple(slices)
    # Pad by one voxel of background where the box touches the border so that MONAI's
    # erosion-based edges see the border as outside, as it does on the full image.
    pad = [(1, 1)] * union.ndim
    return np.pad(pred[sl], pad), np.pad(gt[sl], pad)


def default_nsd_tolerance(spacing: Sequence[float]) -> float:
    """The default surface-Dice tolerance in mm: the mean voxel size of ``spacing`` (X, Y, Z) in mm.

    A fixed 1 mm would be below one voxel on coarse grids (6 mm voxels), where it only counts
    boundary voxels that coincide exactly.
    """
    values = [float(s) for s in spacing]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"spacing must be positive numbers, got {tuple(spacing)}")
    return float(np.mean(values))


def binary_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    nsd_tolerance_mm: float | None = None,
    both_empty: BothEmpty = "nan",
    hd95_one_empty: Hd95OneEmpty = "diagonal",
) -> dict[str, float]:
    """Dice, HD95 (mm) and surface Dice of one binary structure.

    Args:
        pred: bool array (X, Y, Z), the predicted structure.
        gt: bool array (X, Y, Z), the reference structure, same shape.
        spacing: voxel size in mm along (X, Y, Z).
        nsd_tolerance_mm: surface Dice tolerance in mm; None (default): the mean voxel spacing
            (:func:`default_nsd_tolerance`), so a boundary one voxel off still counts as a match.
        both_empty: value of Dice when both segmentations are empty: ``"nan"`` (not scored) or ``"one"``;
            HD95 and surface Dice are NaN then either way (``"one"`` gives surface Dice 1 too).
        hd95_one_empty: HD95 when exactly one segmentation is empty: ``"diagonal"`` (image diagonal in mm),
            ``"inf"`` or ``"nan"``.

    Returns:
        ``{"dice": float, "hd95": float, "nsd": float}``.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and reference differ in shape: {pred.shape} vs {gt.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} does not match a {pred.ndim}-D segmentation")
    if nsd_tolerance_mm is None:
        nsd_tolerance_mm = default_nsd_tolerance(spacing)
    if nsd_tolerance_mm < 0:
        raise ValueError(f"nsd_tolerance_mm must be >= 0, got {nsd_tolerance_mm}")
    if both_empty not in ("nan", "one"):
        raise ValueError(f"both_empty must be 'nan' or 'one', got {both_empty!r}")
    if hd95_one_empty not in ("diagonal", "inf", "nan"):
        raise ValueError(f"hd95_one_empty must be 'diagonal', 'inf' or 'nan', got {hd95_one_empty!r}")

    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        if both_empty == "one":
            return {"dice": 1.0, "hd95": math.nan, "nsd": 1.0}
        return {"dice": math.nan, "hd95": math.nan, "nsd": math.nan}
    if has_p != has_g:
        if hd95_one_empty == "diagonal":
            hd = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
        else:
            hd = math.inf if hd95_one_empty == "inf" else math.nan
        return {"dice": 0.0, "hd95": hd, "nsd": 0.0}

    p, g = _bbox_crop(pred, gt)
    yp = torch.from_numpy(p)[None, None].float()
    yg = torch.from_numpy(g)[None, None].float()
    dice = compute_dice(yp, yg, include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(
            yp, yg, class_thresholds=[nsd_tolerance_mm], include_background=True, spacing=list(spacing)
        )
    return {"dice": float(dice.item()), "hd95": float(hd95.item()), "nsd": float(nsd.item())}


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int],
    **kwargs,
) -> dict[int, dict[str, float]]:
    """Per-class metrics of one case.

    Args:
        pred: integer label map (X, Y, Z).
        gt: integer label map (X, Y, Z), same shape.
        spacing: voxel size in mm along (X, Y, Z).
        labels: the label values to score (background usually left out).
        **kwargs: passed to :func:`binary_metrics`.

    Returns:
        ``{label: {"dice", "hd95", "nsd"}}``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and reference differ in shape: {pred.shape} vs {gt.shape}")
    return {int(c): binary_metrics(pred == c, gt == c, spacing, **kwargs) for c in labels}


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _nanstd(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.std(vals)) if vals else math.nan


@dataclass
class MetricTable:
    """Per-case, per-class scores.

    ``rows`` holds one dict per case: ``{"case": str, "dice_<col>": float, "hd95_<col>": float,
    "nsd_<col>": float, ..., "dice_mean": float, "hd95_mean": float, "nsd_mean": float}`` where
    ``<col>`` is :func:`column_name` of the class name (no spaces: ``dice_right_kidney``); the
    ``*_mean`` columns are NaN-skipping means over the classes of that case. ``nsd_tolerance_mm``
    (optional) is the surface-Dice tolerance the scores were computed with, stated in the summary.
    """

    class_names: list[str]
    rows: list[dict] = field(default_factory=list)
    nsd_tolerance_mm: float | None = None

    def __post_init__(self) -> None:
        self.class_names = [str(n) for n in self.class_names]
        cols = [column_name(n) for n in self.class_names]
        clash = sorted({c for c in cols if cols.count(c) > 1 or c == "mean"})
        if clash:
            raise ValueError(f"class names {self.class_names} give clashing column names {clash}")

    @property
    def columns(self) -> list[str]:
        """CSV columns in order."""
        cols = ["case"]
        for name in self.class_names:
            cols += [f"{m}_{column_name(name)}" for m in METRICS]
        cols += [f"{m}_mean" for m in METRICS]
        return cols

    @property
    def case_ids(self) -> list[str]:
        return [str(r["case"]) for r in self.rows]

    def add_case(self, case_id: str, scores: dict[str, dict[str, float]]) -> dict:
        """Append one case given ``{class_name: {"dice", "hd95", "nsd"}}``; returns the row."""
        row: dict = {"case": str(case_id)}
        for name in self.class_names:
            s = scores.get(name, {})
            for m in METRICS:
                row[f"{m}_{column_name(name)}"] = float(s.get(m, math.nan))
        for m in METRICS:
            row[f"{m}_mean"] = _nanmean(row[f"{m}_{column_name(n)}"] for n in self.class_names)
        self.rows.append(row)
        return row

    def values(self, metric: str, class_name: str) -> list[float]:
        """One value per case (NaN where not scored) of ``metric`` for ``class_name`` (or ``"mean"``)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        key = f"{metric}_{column_name(class_name)}"
        return [float(r.get(key, math.nan)) for r in self.rows]

    def summary(self) -> dict:
        """Per-class (and overall) mean, std and number of scored cases of each metric.

        Returns:
            ``{"num_cases": int, "classes": {name: {"dice_mean", "dice_std", "dice_n", ...}},
            "mean": {"dice": float, "hd95": float, "nsd": float}}`` where ``mean`` is the mean over
            classes of the per-class means (NaN classes skipped). Infinite HD95 values are kept,
            so a mean with one of them is inf.
        """
        classes: dict[str, dict[str, float]] = {}
        for name in self.class_names:
            entry: dict[str, float] = {}
            for m in METRICS:
                vals = self.values(m, name)
                entry[f"{m}_mean"] = _nanmean(vals)
                entry[f"{m}_std"] = _nanstd(vals)
                entry[f"{m}_n"] = int(sum(not math.isnan(v) for v in vals))
            classes[name] = entry
        overall = {m: _nanmean(classes[n][f"{m}_mean"] for n in self.class_names) for m in METRICS}
        out = {"num_cases": len(self.rows), "classes": classes, "mean": overall}
        if self.nsd_tolerance_mm is not None:
            out["nsd_tolerance_mm"] = float(self.nsd_tolerance_mm)
        return out

    def summary_markdown(self, title: str | None = None) -> str:
        """The summary as a Markdown table: one line per class, Dice / HD95 / NSD as mean +- std."""
        s = self.summary()
        tol = self.nsd_tolerance_mm
        nsd_head = "surface Dice" if tol is None else f"surface Dice ({tol:g} mm)"
        lines = [f"## {title}", ""] if title else []
        lines += [
            f"{s['num_cases']} case(s). Mean +- std over the cases where a class is scored (n).",
            "",
            f"| class | Dice | HD95 (mm) | {nsd_head} | n |",
            "| --- | --- | --- | --- | --- |",
        ]

        def fmt(mean: float, std: float, digits: int) -> str:
            return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} +- {std:.{digits}f}"

        for name in self.class_names:
            e = s["classes"][name]
            lines.append(
                f"| {name} | {fmt(e['dice_mean'], e['dice_std'], 4)} | {fmt(e['hd95_mean'], e['hd95_std'], 2)} "
                f"| {fmt(e['nsd_mean'], e['nsd_std'], 4)} | {e['dice_n']} |"
            )
        m = s["mean"]
        means = ["n/a" if math.isnan(m[k]) else f"{m[k]:.{d}f}" for k, d in (("dice", 4), ("hd95", 2), ("nsd", 4))]
        lines.append(f"| **mean** | {means[0]} | {means[1]} | {means[2]} | |")
        lines += ["", "A class absent from both reference and prediction is not scored (n counts the scored "
                  "cases); one missed or hallucinated completely scores Dice 0, surface Dice 0 and HD95 = the "
                  "image diagonal in mm."]
        if tol is not None:
            lines.append(f"Surface Dice counts boundary voxels within {tol:g} mm of the other boundary.")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write ``rows`` as CSV (atomically: temp file then rename). NaN is written as ``nan``."""
        with atomic_write(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: (r[k] if k == "case" else repr(float(r[k]))) for k in self.columns})

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "MetricTable":
        """Read a ``per_case.csv`` written by :meth:`to_csv`. Column names of older files with
        spaces (``dice_right kidney``) are read as today's (``dice_right_kidney``)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no per-case CSV at {path}")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "case" not in fields:
                raise ValueError(f"{path} is not a per-case metrics CSV (no 'case' column)")
            keys = {}
            for col in fields:
                if col == "case":
                    continue
                metric, sep, name = col.partition("_")
                keys[col] = f"{metric}{sep}{column_name(name)}" if metric in METRICS and sep else col
            names = [keys[col][len("dice_"):] for col in fields
                     if col.startswith("dice_") and keys[col] != "dice_mean"]
            table = cls(class_names=names)
            for raw in reader:
                row: dict = {"case": raw["case"]}
                for col in fields:
                    if col != "case":
                        try:
                            row[keys[col]] = float(raw[col]) if raw[col] not in ("", None) else math.nan
                        except ValueError as exc:
                            raise ValueError(f"{path}: column {col!r} of case {raw['case']!r} is not a number") from exc
                table.rows.append(row)
        return table


def evaluate_cases(
    cases: Iterable[tuple[str, np.ndarray, np.ndarray, Sequence[float]]],
    class_names: Sequence[str],
    *,
    labels: Sequence[int] | None = None,
    nsd_tolerance_mm: float | None = None,
    both_empty: BothEmpty = "nan",
    hd95_one_empty: Hd95OneEmpty = "diagonal",
) -> MetricTable:
    """Score a sequence of cases.

    Args:
        cases: ``(case_id, pred, gt, spacing)`` with integer label maps ``pred`` / ``gt`` of shape
            (X, Y, Z) and the voxel size in mm along (X, Y, Z).
        class_names: one name per label value in ``labels``.
        labels: label values to score; default ``1 .. len(class_names)`` (background 0 excluded).
        nsd_tolerance_mm, both_empty, hd95_one_empty: see :func:`binary_metrics`.

    Returns:
        A :class:`MetricTable` with one row per case.
    """
    class_names = [str(n) for n in class_names]
    if labels is None:
        labels = list(range(1, len(class_names) + 1))
    labels = [int(v) for v in labels]
    if len(labels) != len(class_names):
        raise ValueError(f"{len(labels)} labels but {len(class_names)} class names")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique: {class_names}")
    table = MetricTable(class_names=list(class_names))
    for case_id, pred, gt, spacing in cases:
        per_label = case_metrics(
            pred,
            gt,
            spacing,
            labels,
            nsd_tolerance_mm=nsd_tolerance_mm,
            both_empty=both_empty,
            hd95_one_empty=hd95_one_empty,
        )
        row = table.add_case(case_id, {n: per_label[c] for n, c in zip(class_names, labels)})
        logger.debug("case %s: mean Dice %.4f", case_id, row["dice_mean"])
    return table
