#!/usr/bin/env bash
# One device call: CUDA tests of the fast paths, then the whole-step benchmarks (baseline and the
# fastest variant of each, in the same run). Logs under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== CUDA tests"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/ops/test_conv3d.py tests/ops/test_selective_scan_triton.py \
  tests/ops/test_toki.py tests/pretrain/test_mambamim.py::test_no_leak_on_cuda_fast_paths tests/engine/test_cuda_training.py \
  > $OUT/tests.log 2>&1; tail -5 $OUT/tests.log; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head
echo "== step benchmarks"
timeout 170 python3 benchmarks/bench_steps.py --only pretrain --variants 4 --iters 8 > $OUT/bench_pretrain.log 2>&1
grep -v -i warn $OUT/bench_pretrain.log | tail -3
timeout 230 python3 benchmarks/bench_steps.py --only finetune infer --variants 3 --iters 6 > $OUT/bench_ft.log 2>&1
grep -v -i warn $OUT/bench_ft.log | tail -4
