#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the device machine: CUDA tests, a CLI smoke run of
# pretrain/finetune with --compile on CUDA, and the whole-step benchmarks (baseline + fastest).
# Expects the wheels of monai, nibabel, pydicom, tqdm and pytest in .whl/ (see the device README).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import yaml, scipy, matplotlib; print('deps ok')"
echo "== CUDA tests"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/ops/test_selective_scan_triton.py tests/ops/test_toki.py \
  tests/engine/test_cuda_training.py 2>&1 | tail -8
echo "== CLI on CUDA with --compile (tiny)"
W=/tmp/w; rm -rf $W; mkdir -p $W
( cd $W && timeout 150 python3 -m mambamim data synth --out raw --num 3 --seed 0 >/dev/null \
  && timeout 150 python3 -m mambamim data prepare --input raw --out cache --no-progress --min-size 64 >/dev/null \
  && timeout 150 python3 -m mambamim pretrain --data cache --out pt --size tiny --crop 64 --batch-size 4 --num-crops 2 \
       --steps 6 --workers 2 --no-progress --compile --device cuda 2>&1 | tail -2 \
  && timeout 150 python3 -m mambamim finetune --data cache --out ft --size tiny --crop 64 --batch-size 4 --num-crops 2 \
       --iterations 6 --val-every 6 --workers 2 --no-progress --compile --pretrained pt --device cuda 2>&1 | tail -2 )
echo "== step benchmarks"
timeout 330 python3 benchmarks/bench_steps.py --only toki pretrain finetune infer --best-only --variants 4 --iters 6 \
  2>&1 | grep -v -i warn | tail -16
