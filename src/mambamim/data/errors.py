"""Errors raised while reading, checking and preprocessing input data."""

from __future__ import annotations

import os


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
