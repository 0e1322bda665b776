#!/usr/bin/env bash
# One call on a 2-GPU machine: fast-path CUDA tests, the pre-training step (baseline and fastest, same
# run) on GPU 0, then DDP scaling 1 -> 2 GPUs. A Triton path whose tests fail is switched off
# (MAMBAMIM_DISABLE_TRITON) for the benchmarks, and the log says so. Logs under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
T="timeout 75 python3 -m pytest -x -q -p no:cacheprovider"
CUDA_VISIBLE_DEVICES=0 $T tests/ops/test_conv3d.py tests/pretrain/test_mambamim.py::test_no_leak_on_cuda_fast_paths > $OUT/t_conv.log 2>&1
rc_conv=$?; echo "conv tests rc=$rc_conv"; grep -v -i warn $OUT/t_conv.log | grep -E "passed|failed|Error|error|assert" | head -12
CUDA_VISIBLE_DEVICES=0 $T tests/ops/test_selective_scan_triton.py -k "cuda_fp32_parity or autocast or non_contiguous" tests/ops/test_toki.py > $OUT/t_scan.log 2>&1
rc_scan=$?; echo "scan tests rc=$rc_scan"; grep -v -i warn $OUT/t_scan.log | grep -E "passed|failed|Error|error|assert" | head -12
off=""; [ $rc_conv -ne 0 ] && off="dwconv"; [ $rc_scan -ne 0 ] && off="$off,scan"
export MAMBAMIM_DISABLE_TRITON=$off; echo "MAMBAMIM_DISABLE_TRITON=$off"
echo "== pre-training step (GPU 0)"
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/bench_steps.py --only pretrain --variants 4 --iters 8 > $OUT/bench_pretrain.log 2>&1
grep -v -i warn $OUT/bench_pretrain.log | tail -3
echo "== DDP scaling"
for n in 1 2; do
  timeout 70 torchrun --standalone --nproc_per_node $n benchmarks/bench_ddp.py --steps 12 --warmup 4 --append $OUT/ddp.txt > $OUT/ddp$n.log 2>&1
  grep -v -i warn $OUT/ddp$n.log | tail -2
done
cat $OUT/ddp.txt
