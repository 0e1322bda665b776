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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence

from torch import nn

from mambamim.inference.sliding_window import WindowOptions

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
    ``skip_existing``, ``progress``, ``on_case``."""

    suffix: str
    overwrite: bool
    skip_existing: bool
    progress: bool
    on_case: Callable[[CaseOutcome], None] | None


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


def _progress(items: list, desc: str, enabled: bool) -> Iterable:
    """A tqdm bar on stderr over ``items`` (plain iteration when disabled or tqdm is missing)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, total=len(items), file=sys.stderr, dynamic_ncols=True, leave=True)


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
        window: sliding-window options (:class:`mambamim.inference.WindowOptions`: ``roi`` (default: the
            checkpoint's), ``overlap``, ``sw_batch_size``, ``tta_flips``, ``device``, ``amp``).

    Returns:
        A :class:`PredictionResult` listing every case in input order.

    Raises:
        ValueError: ``overwrite`` and ``skip_existing`` together, or no case found under ``inputs``.
    """
    if overwrite and skip_existing:
        raise ValueError("overwrite and skip_existing exclude each other")
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    cases = discover_inputs(items)
    if not cases:
        raise ValueError(f"no NIfTI files or DICOM series found in {', '.join(os.fspath(i) for i in items)}")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    result = PredictionResult(out_dir=out)
    t0 = time.perf_counter()
    for case in _progress(cases, "predict", progress):
        outcome = _predict_one(model, info, case, os.path.join(out, f"{case.case_id}{suffix}"), overwrite=overwrite,
                               skip_existing=skip_existing, **window)
        logger.debug("%s: %s %s", outcome.case_id, outcome.status, outcome.message or outcome.output)
        result.cases.append(outcome)
        if on_case is not None:
            on_case(outcome)
    result.seconds = time.perf_counter() - t0
    return result


def _predict_one(model: nn.Module, info: dict[str, Any], case: InputCase, out_path: str, *, overwrite: bool,
                 skip_existing: bool, **window: Unpack[WindowOptions]) -> CaseOutcome:
    """One case of :func:`predict_files`: its outcome (never raises for a bad input)."""
    from mambamim.inference.segment import segment_image

    if case.error is not None or case.image_paths is None:
        return CaseOutcome(case.case_id, case.source, "failed", message=case.error, unreadable=True)
    if os.path.lexists(out_path) and not overwrite:
        return CaseOutcome(case.case_id, case.source, "skipped" if skip_existing else "refused", output=out_path)
    paths = list(case.image_paths)
    try:
        segment_image(model, info, paths, out_path, **window)
    except Exception as exc:  # one bad case must not stop the others
        msg = str(exc) if paths[0] in str(exc) else f"{paths[0]}: {exc}"
        return CaseOutcome(case.case_id, case.source, "failed", message=msg)
    return CaseOutcome(case.case_id, case.source, "written", output=out_path)
