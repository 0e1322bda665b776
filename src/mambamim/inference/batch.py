"""Batch prediction: segment many image files with one loaded network, each written in its own grid.

A case that fails is recorded with the file it concerns and the others still run; an output that
already exists is never replaced unless asked (``overwrite``) and may be skipped (``skip_existing``);
every file is written atomically (:func:`mambamim.data.preprocess.save_nifti_atomic`). The
checkpoint-loading entry point is :func:`mambamim.api.predict_folder`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from mambamim.inference.sliding_window import WindowOptions, predict_labels

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

__all__ = ["InputCase", "CaseOutcome", "PredictionResult", "PredictOptions", "discover_inputs", "predict_files"]

Status = Literal["written", "failed", "skipped", "refused"]


@dataclass(frozen=True)
class InputCase:
    """One case found under the inputs: ``image_paths`` (one per channel) or the ``error`` that makes it
    unreadable; ``source`` is the path to name in messages."""

    case_id: str
    image_paths: tuple[str, ...] | None
    error: str | None
    source: str


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to one case: ``status`` "written" (``output`` is the label map), "failed"
    (``message`` says why, naming the file), "skipped" or "refused" (``output`` exists already).
    ``unreadable``: it failed before prediction, when the inputs were listed (``source`` is that input)."""

    case_id: str
    source: str
    status: Status
    output: str | None = None
    message: str | None = None
    unreadable: bool = False


@dataclass
class PredictionResult:
    """The outcome of :func:`predict_files`, one :class:`CaseOutcome` per case in input order."""

    out_dir: str
    cases: list[CaseOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def _with(self, status: Status) -> list[CaseOutcome]:
        return [c for c in self.cases if c.status == status]

    @property
    def written(self) -> list[str]:
        """Paths of the label maps written."""
        return [c.output for c in self._with("written") if c.output is not None]

    @property
    def failed(self) -> list[tuple[str, str]]:
        """``(case id, message)`` of every case that failed."""
        return [(c.case_id, c.message or "") for c in self._with("failed")]

    @property
    def skipped(self) -> list[str]:
        """Outputs left as they were because they existed (``skip_existing``)."""
        return [c.output for c in self._with("skipped") if c.output is not None]

    @property
    def refused(self) -> list[str]:
        """Outputs that existed and were neither replaced nor skipped (their cases did not run)."""
        return [c.output for c in self._with("refused") if c.output is not None]


class PredictOptions(WindowOptions, total=False):
    """The keywords of :func:`predict_files` after its positional arguments (also those of
    :func:`mambamim.api.predict_folder`): the window options and ``suffix``, ``overwrite``,
    ``skip_existing``, ``progress``, ``on_case``, ``overlap_io``, ``read_ahead``."""

    suffix: str
    overwrite: bool
    skip_existing: bool
    progress: bool
    on_case: Callable[[CaseOutcome], None] | None
    overlap_io: bool
    read_ahead: int


def discover_inputs(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[InputCase]:
    """Every case under ``inputs`` (NIfTI files, folders of them, DICOM series folders), in order.

    An input that cannot be read becomes a case with its ``error``; repeated case ids get ``_2``,
    ``_3``, ... so that no two cases write the same file.
    """
    from mambamim.data.errors import DataError
    from mambamim.data.io import discover_cases

    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found: list[InputCase] = []
    for raw in items:
        inp = os.fspath(raw)
        try:
            cases = discover_cases(inp)
        except (DataError, OSError) as exc:
            found.append(InputCase(os.path.basename(os.path.normpath(inp)) or inp, None, str(exc), inp))
            continue
        for c in cases:
            if c.error or not c.image_paths:
                where = c.error_path or inp
                found.append(InputCase(c.case_id, None, f"{where}: {c.error or 'no image'}", where))
            else:
                found.append(InputCase(c.case_id, tuple(c.image_paths), None, c.image_paths[0]))
    seen: dict[str, int] = {}
    out = []
    for case in found:
        n = seen.get(case.case_id, 0)
        seen[case.case_id] = n + 1
        out.append(case if n == 0 else InputCase(f"{case.case_id}_{n + 1}", case.image_paths, case.error, case.source))
    return out


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr counting to ``total`` (None when disabled or tqdm is missing)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=True)


def predict_files(
    model: nn.Module,
    info: dict[str, Any],
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    suffix: str = "_seg.nii.gz",
    overwrite: bool = False,
    skip_existing: bool = False,
    progress: bool = False,
    on_case: Callable[[CaseOutcome], None] | None = None,
    overlap_io: bool = True,
    read_ahead: int = 2,
    **window: Unpack[WindowOptions],
) -> PredictionResult:
    """Segment every case under ``inputs`` with a loaded network, writing ``out_dir/<case><suffix>``.

    Each label map is written atomically in its input's own voxel grid, orientation and affine
    (:func:`mambamim.inference.segment_image`). A case that fails (unreadable file, wrong channel count,
    ...) is recorded with its file and the others still run.

    Args:
        model, info: a segmentation network and its checkpoint info
            (:func:`mambamim.engine.inference.load_segmenter`).
        inputs: NIfTI file(s), folder(s) of NIfTI files or DICOM series folder(s).
        out_dir: created if needed.
        suffix: output name suffix.
        overwrite: replace outputs that exist; otherwise such a case is "refused" (not run).
        skip_existing: mark cases whose output exists as "skipped" (not run) instead of refused.
        progress: a tqdm bar on stderr.
        on_case: called with each :class:`CaseOutcome` as soon as it is known (e.g. to report it live).
        overlap_io: read and preprocess the next cases, and map back and write the last one, in background
            threads while the network runs (the same results; False runs the stages one after another).
        read_ahead: with ``overlap_io``, how many cases are read and preprocessed at once ahead of the network
            (each in its own thread; gzip decompression and resampling release the GIL; each holds its
            preprocessed image). 2 by default: with a compiled network on a GPU, reading one case took longer
            than segmenting one.
        window: sliding-window options (:class:`mambamim.inference.WindowOptions`: ``roi`` (default: the
            checkpoint's), ``overlap``, ``sw_batch_size``, ``tta_flips``, ``device``, ``amp``).

    Returns:
        A :class:`PredictionResult` listing every case in input order.

    Raises:
        ValueError: ``overwrite`` and ``skip_existing`` together, ``read_ahead`` below 1, or no case found
            under ``inputs``.
    """
    if overwrite and skip_existing:
        raise ValueError("overwrite and skip_existing exclude each other")
    if isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 1:
        raise ValueError(f"read_ahead must be a whole number of cases >= 1, got {read_ahead!r}")
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    cases = discover_inputs(items)
    if not cases:
        raise ValueError(f"no NIfTI files or DICOM series found in {', '.join(os.fspath(i) for i in items)}")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    result = PredictionResult(out_dir=out)
    t0 = time.perf_counter()
    jobs = [_Job(case, os.path.join(out, f"{case.case_id}{suffix}")) for case in cases]
    for job in jobs:
        job.outcome = _before_running(job, overwrite=overwrite, skip_existing=skip_existing)
    bar = _progress(len(jobs), "predict", progress)
    for outcome in _run_in_order(model, info, jobs, read_ahead if overlap_io else 0, window):
        logger.debug("%s: %s %s", outcome.case_id, outcome.status, outcome.message or outcome.output)
        result.cases.append(outcome)
        if bar is not None:
            bar.update(1)
        if on_case is not None:
            on_case(outcome)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class _Job:
    """A case and its output path; ``outcome`` is set once known, or holds the Future of its write stage."""

    case: InputCase
    out_path: str
    outcome: CaseOutcome | Future | None = None

    @property
    def paths(self) -> list[str]:
        return list(self.case.image_paths or ())

    def failed(self, exc: BaseException) -> CaseOutcome:
        """The outcome of a case that ran and failed, its message naming the (first) input file."""
        first = self.paths[0]
        msg = str(exc) if first in str(exc) else f"{first}: {exc}"
        return CaseOutcome(self.case.case_id, self.case.source, "failed", message=msg)


def _before_running(job: _Job, *, overwrite: bool, skip_existing: bool) -> CaseOutcome | None:
    """The outcome of a case that will not run (unreadable, or its output exists); None if it runs."""
    case = job.case
    if case.error is not None or case.image_paths is None:
        return CaseOutcome(case.case_id, case.source, "failed", message=case.error, unreadable=True)
    if os.path.lexists(job.out_path) and not overwrite:
        return CaseOutcome(case.case_id, case.source, "skipped" if skip_existing else "refused", output=job.out_path)
    return None


class _Inline:
    """The executor interface, running each call at once in this thread (``overlap_io=False``)."""

    def submit(self, fn: Callable, *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _write_stage(job: _Job, labels: Any, meta: dict[str, Any]) -> CaseOutcome:
    from mambamim.inference.segment import write_case

    try:
        write_case(labels, meta, job.out_path)
    except Exception as exc:  # one bad case must not stop the others
        return job.failed(exc)
    return CaseOutcome(job.case.case_id, job.case.source, "written", output=job.out_path)


def _run_in_order(model: nn.Module, info: dict[str, Any], jobs: list[_Job], read_ahead: int,
                  window: dict[str, Any]) -> Iterator[CaseOutcome]:
    """Every job's outcome, in input order, as soon as it and those before it are known. The network runs
    here; with ``read_ahead`` > 0 the reading of the next ``read_ahead`` cases and the last ones' writing (two
    at most) run in worker threads meanwhile; 0 runs every stage here, one after another."""
    from mambamim.inference.segment import load_case

    runnable = [job for job in jobs if job.outcome is None]
    ahead = max(1, read_ahead)  # inline (0), a load runs when submitted: one case ahead, as before threads
    pool = ThreadPoolExecutor(max_workers=read_ahead + 1, thread_name_prefix="mambamim-io") if read_ahead else _Inline()
    with pool:
        loads = {id(job): pool.submit(load_case, info, job.paths) for job in runnable[:ahead]}
        shown = yield from _ready(jobs, 0, block=False)  # cases that do not run, ahead of the first that does
        for k, job in enumerate(runnable):
            pending = loads.pop(id(job))
            wait([pending])  # this case's reading has ended before the next one's starts beside the others
            if k + ahead < len(runnable):
                nxt = runnable[k + ahead]
                loads[id(nxt)] = pool.submit(load_case, info, nxt.paths)
            try:
                image, meta = pending.result()
                labels = predict_labels(model, info, torch.from_numpy(image), **window)
            except Exception as exc:  # one bad case must not stop the others
                job.outcome = job.failed(exc)
            else:
                _wait_for_writes(jobs, limit=1)
                job.outcome = pool.submit(_write_stage, job, labels, meta)
            shown = yield from _ready(jobs, shown, block=False)
        yield from _ready(jobs, shown, block=True)


def _wait_for_writes(jobs: list[_Job], limit: int) -> None:
    """Block until at most ``limit`` write stages are still running (bounds the label maps held)."""
    running = [job.outcome for job in jobs if isinstance(job.outcome, Future) and not job.outcome.done()]
    for fut in running[: max(0, len(running) - limit)]:
        fut.result()


def _ready(jobs: list[_Job], shown: int, block: bool) -> Iterator[CaseOutcome]:
    """Yield the outcomes from ``jobs[shown]`` on while they are known (waiting for writes if ``block``);
    returns the new count shown."""
    while shown < len(jobs):
        outcome = jobs[shown].outcome
        if isinstance(outcome, Future):
            if not (block or outcome.done()):
                break
            outcome = jobs[shown].outcome = outcome.result()
        if outcome is None:
            break
        yield outcome
        shown += 1
    return shown
