"""Errors raised while reading, checking and preprocessing input data, and the output-folder check.

Standard library only: the CLI imports this before any command runs.
"""

from __future__ import annotations

import os
from pathlib import Path


class DataError(ValueError):
    """A problem with one input file (or DICOM series folder).

    ``path`` names the file, ``problem`` says what is wrong; ``str(err)`` gives both.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str | None = None) -> None:
        if problem is None:  # DataError("message"), as torch's DataLoader re-raises a worker's error
            path, problem = None, str(path)
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # picklable across worker processes
        return (DataError, (self.path, self.problem))


def output_dir_problem(path: str | os.PathLike, option: str = "--out") -> str | None:
    """Why ``path`` cannot be used as an output folder (it is a file, lies under a file, or it or its nearest
    existing parent is not writable), or None when it can. Creates nothing."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return f"{option} is a file, not a folder; give a folder (it is created if missing)"
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return f"{option} cannot be created: {anc} is a file, not a folder"
    if not os.access(anc, os.W_OK | os.X_OK):
        where = "" if anc == p else f" ({anc} is read-only, so the folder cannot be created)"
        return f"{option} is not writable{where}; give a folder you can write to"
    return None
