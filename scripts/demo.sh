#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole MambaMIM pipeline on synthetic data (CPU is fine).
# Usage: bash scripts/demo.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" || python3 -m pip install -q "torch>=2.3"
python3 -m pip install -q -e .
mambamim demo --out "${1:-demo_out}"
