"""Run a test module's Triton kernels under TRITON_INTERPRET=1 on CPU tensors. The flag is read when
triton is imported, so the check runs in a subprocess: ``python <module> --interpreter-check``, which must
print INTERPRETER OK."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreter_check(module_file: str, timeout: float = 300) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, module_file, "--interpreter-check"], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "INTERPRETER OK" in proc.stdout
