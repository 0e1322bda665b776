"""Run a test module's Triton kernels under TRITON_INTERPRET=1 on CPU tensors. The flag is read when
triton is imported, so the check runs in a subprocess: ``python <module> --interpreter-check``, which must
print INTERPRETER OK."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Triton's interpreter hands a kernel its integer arguments as one-element numpy arrays, and a loop bounded
# by one calls int() on it, which numpy >= 2.4 refuses (the kernels compiled for a GPU are not affected).
_NUMPY_INT_OF_ARRAY = "only 0-dimensional arrays can be converted to Python scalars"


def run_interpreter_check(module_file: str, timeout: float = 300) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, module_file, "--interpreter-check"], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0 and _NUMPY_INT_OF_ARRAY in proc.stderr:
        pytest.skip("this Triton's interpreter cannot run a loop with a runtime bound under numpy >= 2.4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "INTERPRETER OK" in proc.stdout
