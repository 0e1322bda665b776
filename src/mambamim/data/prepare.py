"""``prepare_dataset``: discover, check, preprocess and cache a dataset (resumable, parallel)."""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mambamim.data.cache import (CACHE_FORMAT, CACHE_VERSION, INDEX_NAME, REPORT_NAME, case_dir, case_paths,
                                 check_cached_array, read_cache_index, read_json, save_npy_atomic, write_json_atomic)
from mambamim.data.errors import DataError, output_dir_problem
from mambamim.data.io import CaseSpec, discover_dataset, looks_like_label_map, read_image
from mambamim.data.preprocess import PreprocessParams, preprocess_image, preprocess_label

logger = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    """Outcome of ``prepare_dataset``. ``failed`` / ``excluded`` / ``warnings`` entries: {"case", "file",
    "problem"}; ``excluded`` cases were readable but are left out of the cache (constant images)."""

    out: str
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] | None = None
    seconds: float = 0.0

    @property
    def n_ready(self) -> int:
        """Cases usable in the cache (prepared now or earlier)."""
        return len(self.prepared) + len(self.skipped)

    def exit_code(self, strict: bool = False) -> int:
        """1 when nothing could be prepared, or (strict) when any input failed; else 0."""
        if self.n_ready == 0 or (strict and self.failed):
            return 1
        return 0

    def summary(self) -> str:
        excluded = f"{len(self.excluded)} left out (constant), " if self.excluded else ""
        return (f"{len(self.prepared)} prepared, {len(self.skipped)} skipped (already done), "
                f"{len(self.failed)} failed, {excluded}{len(self.warnings)} warnings in {self.seconds:.1f} s "
                f"-> {self.out}")

    def problems(self) -> str:
        """The failed and left-out cases, one ``case: file: problem`` line each (empty when none)."""
        return _problem_lines(self.failed + self.excluded)

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "prepared": self.prepared, "skipped": self.skipped, "failed": self.failed,
                "excluded": self.excluded, "warnings": self.warnings, "labels": self.labels,
                "seconds": round(self.seconds, 3)}


def _source_stat(spec: CaseSpec) -> list[list[float]]:
    """(size, mtime) of each source file (a DICOM series: its folder), to notice edited inputs on rerun."""
    out = []
    for p in list(spec.image_paths) + ([spec.label_path] if spec.label_path else []):
        p = p.rsplit("#", 1)[0] if not os.path.exists(p) and "#" in p else p
        try:
            st = os.stat(p)
            out.append([int(st.st_size), round(float(st.st_mtime), 3)])
        except OSError:
            out.append([-1, -1.0])
    return out


def _finished_meta(out: Path, spec: CaseSpec, params: PreprocessParams) -> dict | None:
    """The meta of an already finished case made from the same sources and parameters, else None."""
    meta_path = case_dir(out, spec.case_id) / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = read_json(meta_path)
    except Exception:
        return None
    src = meta.get("source", {})
    if (meta.get("preprocessing") != params.to_dict() or src.get("images") != list(spec.image_paths)
            or src.get("label") != spec.label_path or meta.get("source_stat") != _source_stat(spec)):
        return None
    d = case_dir(out, spec.case_id)
    try:  # a missing / truncated .npy (the error message says to re-run prepare): redo the case
        check_cached_array(d / "image.npy", spec.case_id)
        if spec.label_path:
            check_cached_array(d / "label.npy", spec.case_id)
    except DataError as exc:
        logger.info("%s; redoing it", exc)
        return None
    return meta


def _problem_lines(entries: list[dict[str, Any]]) -> str:
    """One indented ``case: file: problem`` line per entry."""
    return "\n".join(f"  {e['case']}: {e['file']}: {e['problem']}" for e in entries)


def _constant_problem(meta: dict, image: np.ndarray) -> str | None:
    """Why a case's image holds nothing to learn from (every voxel equal, before or after the HU window)."""
    lo, hi = meta.get("input_range", [None, None])
    if lo is not None and lo == hi:
        return f"constant image (every voxel is {lo:g}): nothing to learn from"
    if image.size and float(image.min()) == float(image.max()):
        inten = meta.get("intensity", {})
        return (f"constant image after the intensity window [{inten.get('hu_min', 0):g}, "
                f"{inten.get('hu_max', 0):g}] (input values {lo:g} to {hi:g}): nothing to learn from")
    return None


def _check_not_a_label(spec: CaseSpec) -> None:
    """An image named like a label (``x_seg.nii.gz`` with no ``x.nii.gz``) is an image unless its values
    look like a label map: then it is a label whose image is missing."""
    path = spec.image_paths[0]
    data, _, _ = read_image(path, dtype=None)
    if looks_like_label_map(data):
        values = np.unique(data)
        raise DataError(path, f"looks like a label map (its name, and its values: {len(values)} integers "
                              f"{int(values.min())}..{int(values.max())}) but no image of the same name is beside "
                              "it: name the pair x.nii.gz + x_seg.nii.gz (or image.nii.gz + label.nii.gz), or list "
                              "them in a manifest (docs/DATA.md)")


def prepare_case(spec: CaseSpec, out: str | os.PathLike, params: PreprocessParams,
                 labels: dict[str, str] | None = None, keep_constant: bool = False,
                 threads: int | None = None) -> dict[str, Any]:
    """Preprocess one case and write it into the cache at ``out`` (image, label, then meta.json last).

    Returns ``{"id", "status": "ok"|"failed"|"excluded", "shape", "has_label", "label_values", "warnings",
    "error"}``; never raises for data problems (they come back as ``error = {"case", "file", "problem"}``).
    A constant image is ``excluded`` (nothing written) unless ``keep_constant``, which keeps it with a warning.
    ``threads``: for the resampling (see :func:`mambamim.data.preprocess.preprocess_image`).
    """
    result: dict[str, Any] = {"id": spec.case_id, "status": "failed", "warnings": [], "error": None}
    try:
        if spec.label_named:
            _check_not_a_label(spec)
        image, meta = preprocess_image(spec.image_paths, params, case_id=spec.case_id, threads=threads)
        constant = _constant_problem(meta, image)
        d = case_dir(out, spec.case_id)
        meta_path = d / "meta.json"
        if constant and not keep_constant:
            if meta_path.exists():  # an earlier version of this case is no longer valid
                meta_path.unlink()
            result.update(status="excluded", error={
                "case": spec.case_id, "file": spec.image_paths[0],
                "problem": f"{constant}; left out of the cache (prepare with --keep-constant to keep it)"})
            return result
        if constant:
            meta.setdefault("warnings", []).append({"file": spec.image_paths[0],
                                                    "problem": f"{constant}; kept (--keep-constant)"})
        label = preprocess_label(spec.label_path, meta, labels) if spec.label_path else None
        d.mkdir(parents=True, exist_ok=True)
        if meta_path.exists():  # stale case being redone: unfinished until the new meta lands
            meta_path.unlink()
        save_npy_atomic(d / "image.npy", image)
        if label is not None:
            save_npy_atomic(d / "label.npy", label)
        elif (d / "label.npy").exists():
            (d / "label.npy").unlink()
        meta["split"] = spec.split
        meta["source_stat"] = _source_stat(spec)
        meta["files"] = {"image": "image.npy", "label": "label.npy" if label is not None else None}
        write_json_atomic(meta_path, meta)
        result.update(status="ok", shape=[int(s) for s in image.shape], has_label=label is not None,
                      label_values=meta.get("label_values", []),
                      warnings=[{"case": spec.case_id, **w} for w in meta.get("warnings", [])])
    except DataError as exc:
        result["error"] = {"case": spec.case_id, "file": exc.path, "problem": exc.problem}
    except OSError as exc:  # writing the cache: disk full, permissions
        result["error"] = {"case": spec.case_id, "file": exc.filename or str(out),
                           "problem": f"cannot write the cache ({exc.strerror or exc})"}
    except Exception as exc:  # keep going with the other cases; the traceback goes to the debug log
        logger.debug("case %s failed:\n%s", spec.case_id, traceback.format_exc())
        first = spec.image_paths[0] if spec.image_paths else spec.label_path
        result["error"] = {"case": spec.case_id, "file": first,
                           "problem": f"unexpected error ({type(exc).__name__}: {exc})"}
    return result


def check_out_dir(out: str | os.PathLike, option: str = "--out") -> Path:
    """Create the output folder ``out`` (parents too) after checking that it can be: raises DataError naming
    it when it is a file, lies under a file, or is not writable. Returns the resolved path."""
    out_p = Path(out).expanduser().resolve()
    problem = output_dir_problem(out_p, option)
    if problem:
        raise DataError(out_p, problem)
    try:
        out_p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(out_p, f"{option} cannot be created ({exc.strerror or exc})") from None
    return out_p


def _mp_context():
    """Workers start from a clean forkserver (not a fork of a parent that may run torch / CUDA threads)."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _labels_from_values(values: set[int]) -> dict[str, str] | None:
    if not values:
        return None
    top = max(values)
    return {str(i): ("background" if i == 0 else f"class_{i}") for i in range(top + 1)}


def prepare_dataset(input: str | os.PathLike, out: str | os.PathLike, params: PreprocessParams | None = None,
                    workers: int = 1, strict: bool = False, progress: bool = True, keep_constant: bool = False,
                    log_problems: bool = True) -> PrepareReport:
    """Discover the cases under ``input``, check and preprocess them into the cache ``out``.

    Finished cases (meta.json present, same sources and parameters) are skipped, so an interrupted run can
    be restarted. Bad inputs are collected in ``out/report.json`` while the good ones are prepared; with
    ``log_problems`` one warning lists every failed case with its file and reason, and the dataset warnings and
    the summary are logged too (False: the caller reports ``report``'s lists and summary itself). A constant image is left
    out (``report.excluded``) unless ``keep_constant``. ``strict`` only affects ``PrepareReport.exit_code``.
    Raises DataError when ``input`` holds no cases or ``out`` cannot be written.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    params = params or PreprocessParams()
    t0 = time.perf_counter()
    ds = discover_dataset(input)
    out_p = check_out_dir(out)
    report = PrepareReport(out=str(out_p))
    old_index = out_p / INDEX_NAME
    if old_index.is_file():
        try:
            old = read_cache_index(out_p, allow_empty=True)
        except DataError:
            old = None
        if old is not None and old.get("preprocessing") != params.to_dict():
            logger.warning("%s was prepared with other preprocessing parameters; its cases are redone", old_index)

    # with log_problems False the caller reports the warnings, problems and summary itself (the CLI prints
    # them): logging them too would show each twice
    report_level = logging.WARNING if log_problems else logging.DEBUG
    for w in ds.warnings:
        logger.log(report_level, "%s: %s", w["file"], w["problem"])
        report.warnings.append(w)
    non_ct = {k: v for k, v in (ds.channel_names or {}).items() if str(v).strip().upper() not in ("CT", "")}
    if non_ct:
        msg = (f"channels {non_ct} are declared as not CT; the HU window [{params.hu_min:g}, {params.hu_max:g}] "
               "is applied to them anyway")
        logger.log(report_level, "%s", msg)
        report.warnings.append({"case": None, "file": ds.root, "problem": msg})
    shapes: dict[str, list[int]] = {}
    has_label: dict[str, bool] = {}
    label_values: set[int] = set()
    todo: list[CaseSpec] = []
    for spec in ds.cases:
        if spec.error:
            report.failed.append({"case": spec.case_id, "file": spec.error_path, "problem": spec.error})
            continue
        meta = _finished_meta(out_p, spec, params)
        if meta is not None:
            report.skipped.append(spec.case_id)
            shapes[spec.case_id] = meta["cache"]["shape"]
            has_label[spec.case_id] = meta["source"].get("label") is not None
            label_values.update(meta.get("label_values", []))
            continue
        todo.append(spec)
    logger.info("%d cases found in %s (%s layout): %d to prepare, %d already done, %d with problems",
                len(ds.cases), ds.root, ds.kind, len(todo), len(report.skipped), len(report.failed))

    def collect(res: dict[str, Any]) -> None:
        if res["status"] == "ok":
            report.prepared.append(res["id"])
            shapes[res["id"]] = res["shape"]
            has_label[res["id"]] = res["has_label"]
            label_values.update(res["label_values"])
            report.warnings.extend(res["warnings"])
        elif res["status"] == "excluded":
            report.excluded.append(res["error"])
        else:
            report.failed.append(res["error"])
            logger.debug("%s: %s", res["error"]["file"], res["error"]["problem"])

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress or not todo)
    try:
        if workers == 1 or len(todo) <= 1:
            for spec in todo:
                bar.set_postfix_str(spec.case_id, refresh=False)
                collect(prepare_case(spec, out_p, params, ds.labels, keep_constant))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_mp_context()) as pool:
                # one resampling thread per worker process: the processes already fill the cores
                futures = [pool.submit(prepare_case, spec, out_p, params, ds.labels, keep_constant, 1)
                           for spec in todo]
                for fut in as_completed(futures):
                    collect(fut.result())
                    bar.update(1)
    finally:
        bar.close()

    order = {c.case_id: i for i, c in enumerate(ds.cases)}
    report.prepared.sort(key=order.__getitem__)
    for entries in (report.failed, report.excluded):
        entries.sort(key=lambda e: order.get(e["case"], len(order)))
    ready = [c for c in ds.cases if c.case_id in shapes]
    report.labels = ds.labels if ds.labels is not None else (
        _labels_from_values(label_values) if any(has_label.values()) else None)
    index = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "preprocessing": params.to_dict(),
        "labels": report.labels, "source": {"input": str(Path(input).expanduser().resolve()), "layout": ds.kind},
        "cases": [{"id": c.case_id, "image": case_paths(c.case_id)["image"],
                   "label": case_paths(c.case_id)["label"] if has_label[c.case_id] else None,
                   "meta": case_paths(c.case_id)["meta"], "shape": shapes[c.case_id], "split": c.split}
                  for c in ready],
    }
    write_json_atomic(out_p / INDEX_NAME, index)
    report.seconds = time.perf_counter() - t0
    report_dict = {k: v for k, v in report.to_dict().items() if k != "labels"}
    write_json_atomic(out_p / REPORT_NAME, {**report_dict, "input": str(input), "strict": strict})
    if log_problems and report.failed:
        logger.warning("%d of %d cases failed and are not in the cache (also in %s):\n%s", len(report.failed),
                       len(ds.cases), out_p / REPORT_NAME,
                       _problem_lines(report.failed))
    if log_problems and report.excluded:
        logger.warning("%d case(s) left out of the cache:\n%s", len(report.excluded),
                       _problem_lines(report.excluded))
    logger.log(logging.INFO if log_problems else logging.DEBUG, "%s", report.summary())
    return report
