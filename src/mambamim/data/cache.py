"""The preprocessed cache: layout, atomic writes and readers.

```
OUT/dataset.json          {"format": "mambamim-cache", "version": 1, "preprocessing": {...}, "labels": {...} | null,
                           "cases": [{"id", "image", "label" | null, "meta", "shape": [C, X, Y, Z], "split"}]}
OUT/cases/<id>/image.npy  float32 (C, X, Y, Z), np.load(mmap_mode="r") works
OUT/cases/<id>/label.npy  uint8 (X, Y, Z) (uint16 above 255 classes)
OUT/cases/<id>/meta.json  geometry and provenance (see mambamim.data.preprocess); written last
OUT/report.json           {"failed": [{"case", "file", "problem"}], "warnings": [...], ...}
```
A case is finished only when its meta.json exists; every file is written to a temp file and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mambamim.atomic import atomic_write
from mambamim.atomic import write_json_atomic as _write_json_atomic
from mambamim.data.errors import DataError

CACHE_FORMAT = "mambamim-cache"
CACHE_VERSION = 1
INDEX_NAME = "dataset.json"
REPORT_NAME = "report.json"


def case_dir(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / "cases" / case_id


def case_paths(case_id: str) -> dict[str, str]:
    """Paths of one case's files relative to the cache root."""
    base = f"cases/{case_id}"
    return {"image": f"{base}/image.npy", "label": f"{base}/label.npy", "meta": f"{base}/meta.json"}


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` of ``array`` (any shape) through :func:`mambamim.atomic.atomic_write`."""
    arr = np.ascontiguousarray(array)
    with atomic_write(path) as f:
        np.save(f, arr, allow_pickle=False)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Cache JSON files (``indent=1``, final newline), written atomically."""
    _write_json_atomic(path, obj, indent=1)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def is_case_finished(root: str | os.PathLike, case_id: str) -> bool:
    return (case_dir(root, case_id) / "meta.json").is_file()


def read_cache_index(cache_dir: str | os.PathLike, *, allow_empty: bool = False) -> dict:
    """The one reader of ``CACHE/dataset.json``: read and validate it (layout above).

    Also reachable as :func:`mambamim.data.loaders.read_cache_index`.

    Args:
        cache_dir: the cache folder.
        allow_empty: accept an index without cases (default: a cache that holds no case is an error).

    Raises:
        DataError (a ValueError) naming the file: no index, unparsable, not a mambamim cache of a known
        version, no ``cases`` list, or (unless ``allow_empty``) no case.
    """
    path = Path(cache_dir) / INDEX_NAME
    if not path.is_file():
        raise DataError(path, "no cache index here; run `mambamim data prepare --out` on this folder first")
    try:
        index = read_json(path)
    except Exception as exc:
        raise DataError(path, f"cannot parse cache index ({type(exc).__name__}: {exc})") from exc
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise DataError(path, f"not a {CACHE_FORMAT} index (format={index.get('format') if isinstance(index, dict) else None!r})")
    if index.get("version") != CACHE_VERSION:
        raise DataError(path, f"cache version {index.get('version')} is not supported (expected {CACHE_VERSION})")
    if not isinstance(index.get("cases"), list):
        raise DataError(path, "cache index has no 'cases' list")
    if not index["cases"] and not allow_empty:
        raise DataError(path, "the cache holds no case")
    return index


def load_cache_index(root: str | os.PathLike) -> dict:
    """:func:`read_cache_index` with ``allow_empty=True`` (kept for existing callers)."""
    return read_cache_index(root, allow_empty=True)


def _rerun(case_id: str) -> str:
    return f"case {case_id!r} must be prepared again: re-run `mambamim data prepare` with the same --input and --out"


def check_cached_array(path: str | os.PathLike, case_id: str) -> tuple[tuple[int, ...], np.dtype]:
    """Check that a cached ``.npy`` file exists and is complete, by its header and size (the data is not read).

    Returns ``(shape, dtype)``. Raises DataError naming the file and the case when the file is missing,
    truncated or not a ``.npy`` file, saying to re-run ``mambamim data prepare``.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _fortran, dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise DataError(path, f"cached file is missing; {_rerun(case_id)}") from None
    except OSError as exc:
        raise DataError(path, f"cannot read cached file ({exc.strerror or exc}); {_rerun(case_id)}") from None
    except Exception as exc:  # bad magic / header: numpy raises ValueError and friends
        raise DataError(path, f"cached file is not a valid .npy file ({exc}); {_rerun(case_id)}") from None
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < need:
        raise DataError(path, f"cached file is truncated ({size} of {need} bytes); {_rerun(case_id)}")
    return tuple(int(s) for s in shape), dtype


def load_cached_array(path: str | os.PathLike, case_id: str, mmap: bool = True) -> np.ndarray:
    """``np.load`` of a cached array (read-only memory map when ``mmap``) after ``check_cached_array``;
    any problem is a DataError naming the file and the case."""
    check_cached_array(path, case_id)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:
        raise DataError(path, f"cannot load cached file ({type(exc).__name__}: {exc}); {_rerun(case_id)}") from None


def load_case(root: str | os.PathLike, case_id: str, mmap: bool = True) -> dict[str, Any]:
    """One cached case: ``{"id", "image": float32 (C, X, Y, Z), "label": uint8/16 (X, Y, Z) or None,
    "meta": dict}``; arrays are read-only memory maps when ``mmap``.

    Raises DataError naming the file and the case when its meta.json, image.npy or (for a labeled case)
    label.npy is missing, truncated or corrupt.
    """
    root = Path(root)
    d = case_dir(root, case_id)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise DataError(meta_path, f"case {case_id!r} is not in the cache (or was never finished); "
                                   "re-run `mambamim data prepare` with the same --input and --out")
    try:
        meta = read_json(meta_path)
    except Exception as exc:
        raise DataError(meta_path, f"cannot parse ({type(exc).__name__}: {exc}); {_rerun(case_id)}") from None
    image = load_cached_array(d / "image.npy", case_id, mmap)
    has_label = meta.get("source", {}).get("label") is not None
    label = load_cached_array(d / "label.npy", case_id, mmap) if has_label else None
    return {"id": case_id, "image": image, "label": label, "meta": meta}
