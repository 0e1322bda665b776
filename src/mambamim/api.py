"""The Python API of ``mambamim predict``, ``evaluate`` and ``compare``: each command parses its
arguments, calls one function here and prints what it returns.

These functions sit above the engine (they load checkpoints with :mod:`mambamim.engine.inference`)
and the engine-free packages :mod:`mambamim.inference` and :mod:`mambamim.evaluation`, which do the
work. They log (``logging``) and return results; they never print.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from mambamim.evaluation.metrics import MetricTable
    from mambamim.evaluation.stats import PairedResult
    from mambamim.inference.batch import PredictionResult, PredictOptions
    from mambamim.inference.sliding_window import WindowOptions

logger = logging.getLogger(__name__)

__all__ = ["predict_folder", "evaluate_run", "compare_runs", "reconstruct_file", "EvaluationPlan", "EvaluationResult",
           "ComparisonResult", "EvaluationFailed", "RUN_SPLITS", "run_folder", "split_of_run"]


# ------------------------------------------------------------------------------------------- predict


def _load_segmenter(checkpoint: str | os.PathLike, device: str, compile: bool):
    """``(model, info)`` of a fine-tuning checkpoint (``compile``: wrapped for torch.compile)."""
    from mambamim import inference
    from mambamim.engine import inference as loaders

    model, info = loaders.load_segmenter(checkpoint, device)
    if compile:
        model = inference.compile_segmenter(model)
    return model, info


def predict_folder(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    compile: bool = False,
    **options: Unpack[PredictOptions],
) -> PredictionResult:
    """Segment NIfTI files, folders of them or DICOM series folders with a fine-tuning checkpoint.

    Each input's label map is written atomically as ``out_dir/<case><suffix>`` in the input's own voxel
    grid, orientation and affine. A case that fails is recorded (with the file it concerns) and the
    others still run; an output that exists is "refused" unless ``overwrite`` (replace it) or
    ``skip_existing`` (mark it skipped). See :func:`mambamim.inference.batch.predict_files`.

    Args:
        checkpoint: ``best.pt`` / ``last.pt`` of ``mambamim finetune``, or its run folder.
        inputs: NIfTI file(s), folder(s) of NIfTI files, or DICOM series folder(s).
        out_dir: output folder (created).
        device: cuda, cuda:1, cpu or auto.
        compile: torch.compile the network (:func:`mambamim.inference.compile_segmenter`).
        options: :class:`mambamim.inference.batch.PredictOptions`: ``suffix`` ("_seg.nii.gz"),
            ``overwrite``, ``skip_existing``, ``progress`` (a tqdm bar), ``on_case`` (called with each
            case's outcome as it is known), ``overlap_io`` (True: read the next cases and write the last ones
            in threads while the network runs), ``read_ahead`` (cases read at once ahead of the network: 2)
            and the sliding-window options (:class:`mambamim.inference.WindowOptions`; the CLI passes
            ``sw_batch_size=8``).

    Returns:
        A :class:`mambamim.inference.batch.PredictionResult`: every case, written / failed (why) /
        skipped / refused, in input order.

    Raises:
        FileNotFoundError, mambamim.engine.checkpoint.CheckpointError: the checkpoint cannot be loaded.
        ValueError: no case under ``inputs``, or ``overwrite`` with ``skip_existing``.
    """
    from mambamim.inference.batch import predict_files

    if options.get("overwrite") and options.get("skip_existing"):
        raise ValueError("overwrite and skip_existing exclude each other")
    model, info = _load_segmenter(checkpoint, device, compile)
    result = predict_files(model, info, inputs, out_dir, **options)
    logger.debug("wrote %d of %d label map(s) to %s", len(result.written), len(result.cases), result.out_dir)
    return result


# ------------------------------------------------------------------------------------------ evaluate

RUN_SPLITS = {"train": "train", "training": "train", "val": "validation", "validation": "validation"}
"""Split names that select a fine-tuning run's cases, and their key in ``RUN/split.json``."""


class EvaluationFailed(ValueError):
    """An evaluation that :func:`compare_runs` ran itself failed (the message is the evaluation's)."""


@dataclass
class EvaluationPlan:
    """What :func:`evaluate_run` is about to do, known before the first case runs.

    ``run_split``: ``{"name", "ids", "source"}`` when the cases are a fine-tuning run's split (else None);
    ``cache_warning``: the cache was prepared with other preprocessing than the checkpoint's (the text);
    ``prepare_failed``: ``{"file", "problem", ...}`` of raw cases that on-the-fly preparation could not
    prepare; ``amp``: the autocast mode asked for (resolve against ``device`` for the mode used).
    """

    checkpoint: str
    cache: str
    case_ids: list[str]
    split: str | None
    run_split: dict | None
    roi: tuple[int, int, int]
    overlap: float
    tta: bool | str
    amp: bool
    device: Any
    nsd_tolerance_mm: float
    nsd_tolerance_from: str
    cache_warning: str | None = None
    prepare_failed: list[dict] = field(default_factory=list)


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate_run`: the plan, the per-case table, the files written
    (``{"per_case", "summary_json", "summary_md"}``) and the wall time in seconds."""

    plan: EvaluationPlan
    table: MetricTable
    paths: dict[str, Path]
    seconds: float


def run_folder(checkpoint: str | os.PathLike) -> Path:
    """The fine-tuning run folder of a checkpoint: the folder itself, RUN for RUN/checkpoints/x.pt,
    else the checkpoint's folder."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    parent = path.parent
    return parent.parent if parent.name == "checkpoints" else parent


def split_of_run(checkpoint: str | os.PathLike, split: str) -> dict:
    """The case ids of one split (``train`` / ``val``) of the run a checkpoint belongs to.

    Reads ``RUN/split.json`` (written by ``mambamim finetune``), else the ``split`` the checkpoint
    records.

    Returns:
        ``{"name": "train" | "validation", "ids": [case id, ...], "source": path read}``.

    Raises:
        ValueError: no such split name, or no split found (the checkpoint is not inside a
            fine-tuning run folder and records none), or the split holds no case.
    """
    key = RUN_SPLITS.get(split.lower())
    if key is None:
        raise ValueError(f"--split {split!r} is not a split of a fine-tuning run (train or val)")
    run = run_folder(checkpoint)
    split_path = run / "split.json"
    found, source = None, None
    if split_path.is_file():
        try:
            found = json.loads(split_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{split_path}: cannot read the run's split ({exc})") from None
        source = str(split_path)
    else:
        found = _checkpoint_split(checkpoint)
        source = f"the split recorded in {checkpoint}"
    if not isinstance(found, dict) or not isinstance(found.get(key), list):
        raise ValueError(
            f"--split {split}: {checkpoint} is not inside a fine-tuning run folder with a split "
            f"(no {split_path}, and the checkpoint records none); give the run's checkpoints/best.pt, "
            f"or choose cases with --cases")
    ids = [str(c) for c in found[key]]
    if not ids:
        raise ValueError(f"--split {split}: the run {run} has no {key} cases ({source}"
                         + (f"; {found['how']}" if found.get("how") else "") + ")")
    return {"name": key, "ids": ids, "source": source}


def _checkpoint_split(checkpoint: str | os.PathLike) -> dict | None:
    """The ``split`` a fine-tuning checkpoint records (None if unreadable or absent)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = next((p for p in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt")
                     if p.is_file()), path / "checkpoints" / "best.pt")
    if not path.is_file():
        return None
    try:
        from mambamim.engine.checkpoint import load_checkpoint

        state = load_checkpoint(path, map_location="cpu")
    except Exception:  # a damaged file: the model load names the problem
        return None
    split = state.get("split") if isinstance(state, dict) else None
    return split if isinstance(split, dict) else None


def _split_cases(cache: str, run_split: dict, cases: Sequence[str] | None) -> list[str]:
    """The run split's case ids that are labeled cases of ``cache`` (all of them, or it fails), in the
    cache's order, optionally only those in ``cases``."""
    from mambamim.evaluation.report import labeled_cases

    labeled = labeled_cases(cache)
    missing = [c for c in run_split["ids"] if c not in set(labeled)]
    if missing:
        raise ValueError(
            f"{len(missing)} of the run's {len(run_split['ids'])} {run_split['name']} case(s) are not labeled cases "
            f"of {cache}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (from {run_split['source']}; "
            "is --data the data the run was trained on?)")
    wanted = set(run_split["ids"])
    if cases is not None:
        outside = sorted(set(cases) - wanted)
        if outside:
            raise ValueError(f"--cases {', '.join(outside[:10])}: not {run_split['name']} cases of the run")
        wanted &= set(cases)
    return [c for c in labeled if c in wanted]


def _resolve_cache(data: str | os.PathLike, out_dir: str | os.PathLike, info: dict, plan_notes: dict, *,
                   workers: int, progress: bool, log_problems: bool) -> str:
    """The cache to evaluate on: ``data`` itself when it is a cache, else ``out_dir/cache`` prepared
    from it with the checkpoint's preprocessing. Fills ``plan_notes`` ("cache_warning", "prepare_failed")."""
    from mambamim.data.loaders import read_cache_index
    from mambamim.data.preprocess import PreprocessParams
    from mambamim.engine.config import find_cache

    params = PreprocessParams.from_dict(info.get("preprocessing"))
    cache = find_cache(data)
    if cache is not None:
        index = read_cache_index(cache, allow_empty=True)
        if index.get("preprocessing") and PreprocessParams.from_dict(index["preprocessing"]) != params:
            plan_notes["cache_warning"] = (f"cache {cache} was prepared with other preprocessing than the "
                                           f"checkpoint's ({index['preprocessing']} vs {params.to_dict()})")
            if log_problems:
                logger.warning("%s", plan_notes["cache_warning"])
        return str(cache)
    from mambamim.data.prepare import prepare_dataset

    out = os.path.join(out_dir, "cache")
    report = prepare_dataset(data, out, params, workers=max(1, workers), progress=progress,
                             log_problems=log_problems)
    plan_notes["prepare_failed"] = list(report.failed)
    return out


def _prediction_writer(folder: str) -> Callable:
    """on_case callback writing a prediction in its case's original voxel grid and affine."""
    import numpy as np

    from mambamim.data.preprocess import restore_to_original, save_nifti_atomic

    def write(case_id: str, pred, case: dict) -> None:
        dtype = np.uint8 if int(pred.max(initial=0)) <= 255 else np.uint16
        restored, affine = restore_to_original(pred.astype(dtype), case["meta"], is_label=True)
        save_nifti_atomic(restored.astype(dtype, copy=False), affine, os.path.join(folder, f"{case_id}_seg.nii.gz"))

    return write


def evaluate_run(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str | None = None,
    cases: Sequence[str] | None = None,
    save_predictions: bool = False,
    nsd_tolerance_mm: float | None = None,
    device: str = "auto",
    compile: bool = False,
    workers: int = 1,
    progress: bool = False,
    log_problems: bool = True,
    on_start: Callable[[EvaluationPlan], None] | None = None,
    **window: Unpack[WindowOptions],
) -> EvaluationResult:
    """Per-case and per-class Dice / HD95 / surface Dice of a fine-tuning checkpoint on labeled data.

    ``data`` is a prepared cache, or labeled raw data (NIfTI / DICOM / nnU-Net / Decathlon) prepared on
    the fly into ``out_dir/cache`` with the checkpoint's preprocessing. Writes ``out_dir/per_case.csv``,
    ``summary.json`` and ``summary.md`` (and with ``save_predictions`` each prediction as
    ``out_dir/predictions/<case>_seg.nii.gz`` in its original geometry). Scores are computed in cache
    space (:func:`mambamim.evaluation.report.evaluate_on_cache`).

    Args:
        checkpoint: ``best.pt`` / ``last.pt`` of a fine-tuning run, or the run folder.
        data: a cache or labeled raw data.
        out_dir: output folder.
        split: ``train`` / ``val``: exactly the training / validation cases of the checkpoint's run
            (``RUN/split.json``, else the split the checkpoint records); another name (e.g. ``test``):
            the cache's cases marked with it; None: every labeled case.
        cases: only these case ids (with ``split``: of that split).
        nsd_tolerance_mm: surface-Dice tolerance; None: the cache's mean voxel size.
        device, compile: see :func:`predict_folder`.
        workers, progress: of the on-the-fly preparation (``progress`` also the evaluation's bar).
        log_problems: log the cache-preprocessing warning and preparation failures (False: the caller
            reports ``plan.cache_warning`` / ``plan.prepare_failed`` itself).
        on_start: called with the :class:`EvaluationPlan` before the first case runs.
        window: sliding-window options (:class:`mambamim.inference.WindowOptions`).

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        FileNotFoundError: ``data`` or the checkpoint does not exist.
        ValueError: a bad argument, split or case list, or no labeled case to evaluate (DataError for
            unreadable data).
        mambamim.engine.checkpoint.CheckpointError: the checkpoint cannot be loaded.
    """
    from mambamim.evaluation.report import cache_nsd_tolerance, evaluate_on_cache, labeled_cases, write_evaluation
    from mambamim.inference import resolve_device, roi_from_info

    if not os.path.exists(data):
        raise FileNotFoundError(f"data not found: {data}")
    if nsd_tolerance_mm is not None and nsd_tolerance_mm < 0:
        raise ValueError(f"nsd_tolerance_mm must be >= 0, got {nsd_tolerance_mm}")
    run_split = None
    if split is not None and split.lower() in RUN_SPLITS:
        # before loading the model: a checkpoint outside a run is refused at once
        run_split = split_of_run(checkpoint, split)
    model, info = _load_segmenter(checkpoint, device, compile)
    notes: dict[str, Any] = {}
    cache = _resolve_cache(data, out_dir, info, notes, workers=workers, progress=progress, log_problems=log_problems)
    if run_split is not None:
        ids = _split_cases(cache, run_split, cases)
    else:
        ids = labeled_cases(cache, split=split, case_ids=cases)
    tolerance = nsd_tolerance_mm if nsd_tolerance_mm is not None else cache_nsd_tolerance(cache)
    if not ids:
        raise ValueError(f"no labeled case to evaluate in {cache}" + (f" (split {split!r})" if split else ""))
    roi = window.get("roi")
    plan = EvaluationPlan(
        checkpoint=os.fspath(checkpoint), cache=cache, case_ids=ids, split=split, run_split=run_split,
        roi=tuple(roi) if roi else roi_from_info(info), overlap=window.get("overlap", 0.5),
        tta=window.get("tta_flips", False), amp=bool(window.get("amp", True)), device=resolve_device(device),
        nsd_tolerance_mm=float(tolerance),
        nsd_tolerance_from="given" if nsd_tolerance_mm is not None else "the cache's mean voxel size",
        cache_warning=notes.get("cache_warning"), prepare_failed=notes.get("prepare_failed", []))
    if on_start is not None:
        on_start(plan)
    t0 = time.perf_counter()
    on_case = _prediction_writer(os.path.join(out_dir, "predictions")) if save_predictions else None
    table = evaluate_on_cache(model, info, cache, ids, nsd_tolerance_mm=tolerance, progress=progress,
                              on_case=on_case, **window)
    seconds = time.perf_counter() - t0
    extra = {"checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(str(cache)),
             "split": split, "split_source": run_split["source"] if run_split else None,
             "nsd_tolerance_mm": tolerance, "nsd_tolerance_from": plan.nsd_tolerance_from, "overlap": plan.overlap,
             "tta": plan.tta, "seconds": round(seconds, 2)}
    paths = write_evaluation(table, out_dir, title=f"Evaluation of {os.path.basename(checkpoint)}", extra=extra)
    logger.debug("evaluated %d case(s) in %.1f s into %s", len(table.rows), seconds, out_dir)
    return EvaluationResult(plan=plan, table=table, paths=paths, seconds=seconds)


# ------------------------------------------------------------------------------------------- compare


@dataclass
class ComparisonResult:
    """The outcome of :func:`compare_runs`: the paired results per class and metric, the shared cases,
    the two names, the files written and the evaluations it ran itself."""

    results: list[PairedResult]
    shared: list[str]
    name_a: str
    name_b: str
    markdown_path: Path
    json_path: Path
    evaluated: list[EvaluationResult] = field(default_factory=list)


class _Missing(Exception):
    """A run folder without an evaluation."""


def _is_run(folder: str) -> bool:
    """A fine-tuning (or any training) run folder: it has a checkpoints/ folder, split.json or config.yaml."""
    return any(os.path.exists(os.path.join(folder, n)) for n in ("checkpoints", "split.json", "config.yaml"))


def _csv_path(run: str) -> str:
    """The per_case.csv of an evaluation folder, a CSV, or a run folder's single RUN/eval*/per_case.csv.

    Raises:
        _Missing: ``run`` is a run folder without an evaluation.
        FileNotFoundError, ValueError: nothing to compare at ``run``.
    """
    if os.path.isdir(run):
        direct = os.path.join(run, "per_case.csv")
        if os.path.isfile(direct):
            return direct
        found = sorted(glob.glob(os.path.join(glob.escape(run), "eval*", "per_case.csv")))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(os.path.basename(os.path.dirname(f)) for f in found)
            raise ValueError(f"{run} holds several evaluations ({names}): give the one to compare, "
                             f"e.g. {os.path.dirname(found[0])}")
        if _is_run(run):
            raise _Missing(run)
        raise FileNotFoundError(f"no per_case.csv in {run} (not an evaluation folder nor a fine-tuning run)")
    if not os.path.exists(run):
        raise FileNotFoundError(f"no such evaluation: {run}")
    return run


def _name(run: str) -> str:
    path = os.path.abspath(run)
    if os.path.isfile(path):
        path = os.path.dirname(path)
    return os.path.basename(path) or run


def _validation(run: str) -> list[str] | None:
    """The validation case ids of a run (RUN/split.json), or None."""
    try:
        with open(os.path.join(run, "split.json")) as f:
            ids = json.load(f).get("validation")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(i) for i in ids] if isinstance(ids, list) else None


def _run_data(run: str) -> str:
    """The data a run was trained on: RUN/cache when the run prepared one, else config.yaml's ``data``,
    else the placeholder CACHE."""
    from mambamim.engine.config import find_cache

    if find_cache(os.path.join(run, "cache")) is not None:
        return os.path.join(run, "cache")
    try:
        import yaml

        with open(os.path.join(run, "config.yaml")) as f:
            data = (yaml.safe_load(f) or {}).get("data")
    except (OSError, ValueError, AttributeError):
        data = None
    return str(data) if data else "CACHE"


def _eval_out(run: str) -> str:
    """RUN/eval, or RUN/eval_2, ... when RUN/eval already holds something."""
    out, k = os.path.join(run, "eval"), 1
    while os.path.exists(out) and os.listdir(out):
        k += 1
        out = os.path.join(run, f"eval_{k}")
    return out


def _evaluate_argv(run: str, data: str, cases: list[str] | None, out: str) -> list[str]:
    """``mambamim evaluate`` arguments for ``run`` on ``cases`` (``--split val`` when they are its
    validation cases)."""
    argv = ["--checkpoint", run, "--data", data]
    if cases is None or sorted(cases) == sorted(_validation(run) or []):
        argv += ["--split", "val"]
    else:
        argv += ["--cases", *cases]
    return argv + ["--out", out]


def _shared_cases(runs: list[str], tables: list) -> list[str] | None:
    """The case list the missing evaluations use: the cases of the evaluation present, else the
    validation cases the runs share (None: every run's own --split val).

    Raises:
        ValueError: the runs share no validation case.
    """
    known = [t for t in tables if t is not None]
    if known:
        return list(known[0].case_ids)
    vals = [_validation(r) for r in runs]
    if any(v is None for v in vals) or len({tuple(sorted(v)) for v in vals}) == 1:
        return None
    shared = [c for c in vals[0] if all(c in v for v in vals[1:])]
    if not shared:
        raise ValueError(f"{runs[0]} and {runs[1]} share no validation case (RUN/split.json): evaluate both on "
                         "the same held-out cases with `mambamim evaluate --cases ...` and compare those folders")
    return shared


def _evaluations(runs: list[str], data: str | None, device: str, progress: bool,
                 on_evaluate: Callable[[str, list[str]], None] | None,
                 on_evaluation_start: Callable[[EvaluationPlan], None] | None,
                 on_evaluated: Callable[[EvaluationResult], None] | None,
                 log_problems: bool) -> tuple[list[str], list[EvaluationResult]]:
    """The two per_case.csv paths, evaluating the runs that have none on ``data``."""
    from mambamim.evaluation.metrics import MetricTable

    paths: list[str | None] = []
    for run in runs:
        try:
            paths.append(_csv_path(run))
        except _Missing:
            paths.append(None)
    if all(p is not None for p in paths):
        return paths, []  # type: ignore[return-value]
    tables = [MetricTable.from_csv(p) if p is not None else None for p in paths]
    cases = _shared_cases(runs, tables)
    missing = [r for r, p in zip(runs, paths) if p is None]
    if data is None:
        commands = [shlex.join(["mambamim", "evaluate",
                                *_evaluate_argv(r, _run_data(r), cases, os.path.join(r, "eval"))]) for r in missing]
        what = " and ".join(missing)
        raise FileNotFoundError(
            f"no evaluation in {what} (no RUN/eval*/per_case.csv): run `{' && '.join(commands)}` "
            f"first, or pass --data CACHE to evaluate {'it' if len(missing) == 1 else 'them'} here")
    done: list[EvaluationResult] = []
    for k, run in enumerate(runs):
        if paths[k] is not None:
            continue
        out = _eval_out(run)
        argv = _evaluate_argv(run, data, cases, out)
        if on_evaluate is not None:
            on_evaluate(run, argv + ["--device", device] + ([] if progress else ["--no-progress"]))
        by_split = "--split" in argv
        try:
            res = evaluate_run(run, data, out, split="val" if by_split else None, cases=None if by_split else cases,
                               device=device, progress=progress, log_problems=log_problems,
                               on_start=on_evaluation_start, sw_batch_size=8, tta_flips="none")
        except (ValueError, OSError, RuntimeError) as exc:
            raise EvaluationFailed(str(exc)) from exc
        if on_evaluated is not None:
            on_evaluated(res)
        done.append(res)
        paths[k] = str(res.paths["per_case"])
    return paths, done  # type: ignore[return-value]


def compare_runs(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] = ("dice", "hd95", "nsd"),
    name_a: str | None = None,
    name_b: str | None = None,
    device: str = "auto",
    progress: bool = False,
    log_problems: bool = True,
    on_evaluate: Callable[[str, list[str]], None] | None = None,
    on_evaluation_start: Callable[[EvaluationPlan], None] | None = None,
    on_evaluated: Callable[[EvaluationResult], None] | None = None,
) -> ComparisonResult:
    """Per-class means of two evaluations over their shared cases, with paired t-test and Wilcoxon
    p-values, saved as ``comparison.md`` / ``comparison.json``.

    Each run is an evaluation folder holding ``per_case.csv``, the CSV itself, or a fine-tuning run
    folder (its evaluation is ``RUN/eval*/per_case.csv``). A run folder without one is evaluated with
    :func:`evaluate_run` on ``data`` into ``RUN/eval`` (``RUN/eval_2``, ... when taken), on the other
    side's cases (else the runs' shared validation cases).

    Args:
        out_dir: where to save; default run B's evaluation folder.
        metrics: any of ``dice``, ``hd95``, ``nsd``.
        name_a, name_b: labels in the table (default the folder names; "A (x)" / "B (x)" when equal).
        device, progress, log_problems: of the evaluations it runs.
        on_evaluate: called as ``on_evaluate(run, evaluate_argv)`` before each evaluation it runs
            (the equivalent ``mambamim evaluate`` arguments).
        on_evaluation_start, on_evaluated: :func:`evaluate_run`'s ``on_start``, and a call with each
            evaluation's result.

    Returns:
        A :class:`ComparisonResult`.

    Raises:
        FileNotFoundError: nothing to compare at a run, or a run has no evaluation and ``data`` is None
            (the message names the ``mambamim evaluate`` command to run).
        ValueError: several evaluations in a run, no shared case, a bad metric.
        EvaluationFailed: an evaluation it ran failed.
    """
    from mambamim.evaluation.metrics import MetricTable
    from mambamim.evaluation.stats import compare_tables, save_comparison

    runs = [os.fspath(run_a), os.fspath(run_b)]
    (path_a, path_b), done = _evaluations(runs, None if data is None else os.fspath(data), device, progress,
                                          on_evaluate, on_evaluation_start, on_evaluated, log_problems)
    table_a, table_b = MetricTable.from_csv(path_a), MetricTable.from_csv(path_b)
    shared, results = compare_tables(table_a, table_b, metrics=list(metrics))
    name_a = name_a or _name(runs[0])
    name_b = name_b or _name(runs[1])
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    out = out_dir or os.path.dirname(os.path.abspath(path_b))
    md_path, json_path = save_comparison(results, shared, out, name_a, name_b)
    return ComparisonResult(results=results, shared=list(shared), name_a=name_a, name_b=name_b,
                            markdown_path=Path(md_path), json_path=Path(json_path), evaluated=done)


def reconstruct_file(checkpoint: str | os.PathLike, image: str | os.PathLike | Sequence[str], out_png: str | os.PathLike, *,
                     mask_ratio: float | None = None, seed: int = 0, crop: int | None = None,
                     device: str = "auto", amp: str = "auto") -> dict:
    """The paper's Fig. 9 for one image file: the pre-trainer of ``checkpoint`` (last.pt, an epoch
    checkpoint or the run folder) rebuilt exactly as trained, the image preprocessed as in the run,
    a centred crop masked with a seeded random bottleneck mask, and masked input / reconstruction /
    original written as one PNG.

    Returns:
        {"png", "crop", "visible", "tokens", "loss"} (see :func:`mambamim.inference.reconstruct_image`).

    Raises:
        FileNotFoundError / ValueError / RuntimeError: an unreadable checkpoint or a bad option;
        mambamim.data.errors.DataError (a ValueError): an unreadable image.
    """
    from mambamim.engine.inference import load_pretrainer
    from mambamim.inference import reconstruct_image

    pretrainer, info = load_pretrainer(checkpoint, device)
    return reconstruct_image(pretrainer, info, image, out_png, mask_ratio=mask_ratio, seed=seed, crop=crop, amp=amp)
