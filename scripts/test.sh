#!/usr/bin/env bash
# Installs mambamim with its test dependencies on a fresh machine and runs the test suite: by default the fast
# part (every test not marked slow; a few minutes on 2 CPU cores). `bash scripts/test.sh -m slow` runs the
# slow part (torch.compile builds, training runs); a later -m replaces the default one.
# torch is installed first, on its own: a plain `torch` requirement can pull a multi-GB CUDA build,
# while `pip install torch==2.13.0` takes the CPU wheel where one is available locally.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" || python3 -m pip install -q "torch>=2.3"
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q -m "not slow" "$@"
