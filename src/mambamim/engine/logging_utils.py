"""Run-folder logging: ``log.txt`` (the package's log records), ``metrics.csv`` and TensorBoard.

Only the main process writes; on other ranks every method is a no-op.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from mambamim.atomic import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["RunLog", "MetricsWriter", "RunExistsError", "run_files", "check_run_folder", "move_run_aside"]

_PACKAGE_LOGGER = "mambamim"


class RunExistsError(ValueError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


# What a training run writes into its folder. Any of _RUN_MARKERS means "a run is there"; on overwrite
# every entry of _RUN_ENTRIES present is moved aside. RUN/cache (data prepared from raw --data) stays: it
# is data, not results, and is reused as before.
_RUN_MARKERS = ("config.yaml", "metrics.csv", "encoder.pt")
_RUN_ENTRIES = ("config.yaml", "metrics.csv", "encoder.pt", "log.txt", "split.json", "encoder_load_report.json",
                "checkpoints", "tensorboard", "reconstructions")
OVERWRITTEN_PREFIX = ".overwritten-"


def run_files(run_dir: str | os.PathLike) -> list[str]:
    """The files of an earlier run in ``run_dir`` (relative names, checkpoints first); empty when the
    folder does not exist, is empty or holds only unrelated files."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    ckpt = run / "checkpoints"
    found = sorted(f"checkpoints/{p.name}" for p in ckpt.glob("*.pt")) if ckpt.is_dir() else []
    found.sort(key=lambda name: (name not in ("checkpoints/last.pt", "checkpoints/best.pt"), name))
    return found + [name for name in _RUN_MARKERS if (run / name).is_file()]


def check_run_folder(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> list[str]:
    """Refuse to start a new run over an earlier one.

    Returns:
        The earlier run's files (empty: the folder is free, or ``resume`` continues it).

    Raises:
        RunExistsError (a ValueError): ``run_dir`` holds a run and neither ``resume`` nor
            ``overwrite`` is set; the one-line message names what is there.
    """
    if resume:
        return []
    found = run_files(run_dir)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        if (Path(run_dir) / "checkpoints" / "last.pt").is_file():
            how = f"pass --resume {run_dir} to continue it or --overwrite to start over"
        else:
            how = "pass --overwrite to start over (it cannot be resumed: no checkpoints/last.pt)"
        raise RunExistsError(f"{run_dir} already holds a run ({shown}): {how}")
    return found


def move_run_aside(run_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's files (config, metrics, log, checkpoints, TensorBoard events, ...) into
    ``RUN/.overwritten-<timestamp>/`` so that a new run starts clean and nothing is lost.

    Returns:
        The folder they went to, or None when there was nothing to move.
    """
    run = Path(run_dir)
    entries = [name for name in _RUN_ENTRIES if (run / name).exists()]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run / f"{OVERWRITTEN_PREFIX}{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = run / f"{OVERWRITTEN_PREFIX}{stamp}-{n}"
    dest.mkdir()
    for name in entries:
        os.replace(run / name, dest / name)
    return dest


class RunLog:
    """Copy the ``mambamim`` loggers' records to ``RUN/log.txt`` (appending) while open.

    Use as a context manager or call :meth:`close`. The package logger's level is lowered to INFO
    while open if it was higher, and restored on close.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "log.txt"
        self._handler: logging.Handler | None = None
        self._old_level: int | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler.setLevel(logging.INFO)
        pkg = logging.getLogger(_PACKAGE_LOGGER)
        if pkg.getEffectiveLevel() > logging.INFO:
            self._old_level = pkg.level
            pkg.setLevel(logging.INFO)
        pkg.addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        if self._handler is None:
            return
        pkg = logging.getLogger(_PACKAGE_LOGGER)
        pkg.removeHandler(self._handler)
        self._handler.close()
        self._handler = None
        if self._old_level is not None:
            pkg.setLevel(self._old_level)
            self._old_level = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


class MetricsWriter:
    """Append rows of scalars to ``RUN/metrics.csv`` and TensorBoard events in ``RUN/tensorboard``.

    Rows are dicts with a ``step`` key; columns are the union of keys seen (the file is rewritten
    with a wider header when a new key appears, which happens a handful of times per run). With
    ``resume_step`` the rows after that step (written by the interrupted session after its last
    checkpoint) are dropped and TensorBoard purges its events after it.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self._columns: list[str] = []
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with self.path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                self._columns = list(reader.fieldnames or [])
                rows = list(reader)
            if resume_step is not None:
                kept = [r for r in rows if _step_of(r) <= resume_step]
                if len(kept) != len(rows):
                    self._rewrite(kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                logger.warning("tensorboard is not installed: no TensorBoard events")
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                         purge_step=None if resume_step is None else resume_step + 1)

    def _rewrite(self, rows: list[Mapping[str, Any]]) -> None:
        with atomic_write(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in self._columns})

    def log(self, row: Mapping[str, Any], prefix: str = "", phase: str | None = None) -> None:
        """Write one row (``row["step"]`` is required); values go to TensorBoard as
        ``{prefix}{key}``, with a leading ``{phase}_`` of the key dropped (``val_mean_dice`` with
        prefix ``val/`` and phase ``val`` becomes the tag ``val/mean_dice``). ``phase`` ("train",
        "val") also goes to the CSV's ``phase`` column, so training and validation rows are told
        apart. Non-numeric values only go to the CSV."""
        if phase is not None:
            row = {"step": row["step"], "phase": phase, **{k: v for k, v in row.items() if k != "step"}}
        if not self.enabled:
            return
        if "step" not in row:
            raise ValueError("a metrics row needs a 'step'")
        new = [k for k in row if k not in self._columns]
        if new:
            old_rows: list[dict[str, Any]] = []
            if self.path.exists() and self._columns:
                with self.path.open(newline="") as handle:
                    old_rows = list(csv.DictReader(handle))
            self._columns += new
            if "step" in self._columns:
                self._columns.remove("step")
                self._columns.insert(0, "step")
            self._rewrite(old_rows)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns, restval="")
            writer.writerow({k: _fmt(v) for k, v in row.items()})
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                tag = key[len(phase) + 1:] if phase and key.startswith(f"{phase}_") else key
                self._tb.add_scalar(f"{prefix}{tag}", float(value), step)

    def add_image(self, tag: str, image: Any, step: int) -> None:
        """An (H, W, 3) uint8 array to TensorBoard."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _step_of(row: Mapping[str, Any]) -> int:
    try:
        return int(float(row.get("step", 0)))
    except (TypeError, ValueError):
        return 0
