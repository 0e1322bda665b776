"""A read-only folder for the tests, also when they run as root (who may write anywhere)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def make_read_only(path, monkeypatch) -> Path:
    """Create ``path`` as a folder without write permission. Under root, whose writes the kernel does not
    refuse, ``os.access`` is made to answer for ``path`` what it answers an ordinary user."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    if os.access(path, os.W_OK):
        real = os.access
        target = os.path.realpath(path)

        def access(p, mode, *args, **kwargs):
            if mode & os.W_OK and os.path.realpath(p) == target:
                return False
            return real(p, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return path


def restore(path) -> None:
    if Path(path).exists():
        os.chmod(path, stat.S_IRWXU)
