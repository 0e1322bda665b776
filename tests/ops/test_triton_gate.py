"""mambamim.ops._triton: the Triton kernels need Triton 3.0 or newer; older versions fall back to PyTorch."""

from __future__ import annotations

import pytest

from mambamim.ops import _triton


@pytest.mark.parametrize("version, expected", [
    ("3.6.0", (3, 6)), ("3.0.0+git1a2b3c", (3, 0)), ("2.3.1", (2, 3)), ("10", (10, 0)), ("3.1rc1", (3, 1)),
    ("dev", (0, 0)),
])
def test_version_tuple(version, expected):
    assert _triton.version_tuple(version) == expected


def test_gate_matches_the_installed_triton():
    if _triton.triton is None:
        assert not _triton.HAS_TRITON and not _triton.is_available()
    else:
        assert _triton.HAS_TRITON == (_triton.version_tuple(_triton.triton.__version__) >= (3, 0))
