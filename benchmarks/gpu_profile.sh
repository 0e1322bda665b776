#!/usr/bin/env bash
# One device call: module-by-module profile of the pre-training step, the fine-tuning and sliding-window
# variants, and a CLI smoke run of pretrain/finetune with --compile on CUDA. Logs under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== module profile"
timeout 200 python3 benchmarks/profile_modules.py > $OUT/profile.log 2>&1; grep -v -i warn $OUT/profile.log | tail -75
echo "== finetune / sliding window variants"
timeout 240 python3 benchmarks/bench_steps.py --only finetune infer --variants 3 4 --iters 6 > $OUT/bench.log 2>&1
grep -v -i warn $OUT/bench.log | tail -10
echo "== CLI on CUDA with --compile (tiny)"
W=/tmp/w; rm -rf $W; mkdir -p $W; cd $W
timeout 30 python3 -m mambamim data synth --out raw --num 3 --seed 0 >/dev/null
timeout 40 python3 -m mambamim data prepare --input raw --out cache --no-progress --min-size 64 >/dev/null
timeout 100 python3 -m mambamim pretrain --data cache --out pt --size tiny --crop 64 --batch-size 4 --num-crops 2 \
  --steps 6 --workers 2 --no-progress --compile --device cuda > $OUT/cli_pretrain.log 2>&1
echo "pretrain rc=$?"; grep -v -i "userwarn" $OUT/cli_pretrain.log | tail -4
