"""Atomic file writes: a reader sees either the previous file or the complete new one, never a
partial file, and a crash mid-write leaves no temporary file behind.

Every writer of the package (checkpoints, cache arrays, NIfTI, CSV, JSON, YAML, PNG, Markdown)
goes through :func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_write", "write_text_atomic", "write_json_atomic", "fsync_dir"]

_MODES = ("w", "wt", "wb")


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it is durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path``.

    The temporary file is ``.tmp-<random>-<name>`` in the same folder, so it ends with the
    destination's suffix(es) (``.nii.gz``, ``.png``) for writers that pick the format from a file
    name: they may write to ``handle.name`` instead of ``handle``. On exit the file is flushed and
    fsynced (by inode, so data written through ``handle.name`` count too), renamed over ``path``
    with ``os.replace`` and the folder is fsynced. On any exception the temporary file is removed
    and ``path`` is left as it was. The new file gets the usual permissions (0666 less the umask).

    Args:
        path: destination file; missing parent folders are created.
        mode: ``"wb"`` (binary) or ``"w"`` / ``"wt"`` (text).
        encoding, newline: as for :func:`open`, text mode only.

    Raises:
        ValueError: ``mode`` is not a write mode listed above.
    """
    if mode not in _MODES:
        raise ValueError(f"atomic_write mode must be one of {_MODES}, got {mode!r}")
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    excl_mode = mode.replace("w", "x")  # create the temp file exclusively, mode 0666 less umask
    while True:
        tmp = folder / f".tmp-{secrets.token_hex(4)}-{path.name}"
        try:
            handle = open(tmp, excl_mode, encoding=encoding, newline=newline)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns the path."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically. Returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
