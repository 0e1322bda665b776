#!/usr/bin/env bash
# Everything that needs a GPU, in parts that fit one 10-minute device call each (a cold machine spends
# minutes building Triton kernels and compiling). Logs go under $OUT.
#
#   bash benchmarks/gpu_all.sh tests              # CUDA tests of the kernels and the leak tests (TESTS=... picks others)
#   bash benchmarks/gpu_all.sh scantests          # CUDA tests of the selective scan and of training (but the graphs one)
#   bash benchmarks/gpu_all.sh split              # selective-scan tests; sequences split across 1, 2, ... programs
#   bash benchmarks/gpu_all.sh scanab             # the scan timed on this tree and, when carried, on .old/src (A/B)
#   bash benchmarks/gpu_all.sh toki               # TOKI's CUDA tests and its forward, fp32 and bf16 (about 2 minutes)
#   bash benchmarks/gpu_all.sh graphs             # the CUDA-graphs training test alone (two cold compiled runs: > 230 s)
#   bash benchmarks/gpu_all.sh roofline           # time, bytes, FLOPs, fraction of the limits per op (ROOF_ARGS=--task finetune)
#   bash benchmarks/gpu_all.sh pretrain           # pre-training step: baseline, eager bf16, compiled, CUDA graphs, sparse full-res
#   bash benchmarks/gpu_all.sh finetune           # fine-tuning step, sliding window, TOKI (baseline + best)
#   bash benchmarks/gpu_all.sh profile cli        # module profile; CLI smoke run with --compile
#   bash benchmarks/gpu_all.sh conv               # 3^3 full-resolution convolutions alone through cuDNN (TFLOP/s)
#   bash benchmarks/gpu_all.sh profstep           # top kernels of one compiled step (PROF_ARGS=--sparse-full-res)
#   bash benchmarks/gpu_all.sh unmeasured cli     # --memory-budget step, CLI compiled inference; compiled CLI run
#   bash benchmarks/gpu_all.sh engine             # the engine's own step: base CLI runs with --cuda-graphs and without
#                                                 # (ENGINE_RUNS=--cuda-graphs: that one; ENGINE_EXTRA="--memory-budget 0.5")
#   bash benchmarks/gpu_all.sh audit              # where an engine step (eager, base) makes the host wait for the GPU
#   bash benchmarks/gpu_all.sh ddp                # on a 2-GPU machine: DDP scaling 1 -> 2 GPUs
#
# Expects the wheels of monai, nibabel, pydicom, tqdm and pytest in .whl/ (see the device README).
#
# Compile cache between calls (each call gets a bare machine, and a cold compile of one step takes minutes):
# torch.compile's caches (Inductor's FX graphs, AOTAutograd, Triton kernels and autotuning) live in
# $TORCHINDUCTOR_CACHE_DIR (and this script keeps the Triton kernels of mambamim.ops there too). Name .cache in
# the call's carry and the cache found there as .cache/inductor_cache.tgz.* is unpacked first; with
# SAVE_CACHE=1 the cache as it ends is packed into $OUT/inductor_cache.tgz.* (15 MiB parts; at most 4, else it
# is not saved); copy those files into .cache/ (git-ignored locally) for the next call. On the dev CPU a tiny pre-training step compiled in 100 s cold and
# 13 s from the cache. A step that hits the cache skips autotuning, so its first-step peak memory can differ.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
# our own @triton.jit kernels compile into TRITON_CACHE_DIR (default ~/.triton/cache): keep them in the carried cache too
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TORCHINDUCTOR_CACHE_DIR/jit}
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
if ls .cache/inductor_cache.tgz.* > /dev/null 2>&1; then
  cat .cache/inductor_cache.tgz.* | tar -xzf - -C "$TORCHINDUCTOR_CACHE_DIR" && echo "compile cache: unpacked $(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1)"
fi
save_cache() {
  [ "${SAVE_CACHE:-0}" = 1 ] || return 0
  rm -f "$OUT"/inductor_cache.tgz.*
  tar -czf - -C "$TORCHINDUCTOR_CACHE_DIR" . | split -b 15m -d - "$OUT/inductor_cache.tgz."
  local parts; parts=$(ls "$OUT"/inductor_cache.tgz.* | wc -l)
  if [ "$parts" -gt 4 ]; then rm -f "$OUT"/inductor_cache.tgz.*; echo "compile cache: $parts parts of 15 MiB, not saved"
  else echo "compile cache: saved in $parts part(s), $(du -ch "$OUT"/inductor_cache.tgz.* | tail -1 | cut -f1)"; fi
}
trap save_cache EXIT
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
quiet() { grep -v -i -E "userwarning|warnings.warn|^ *$"; }
run_tests() {  # name, limit in s, pytest arguments; -k: pytest ignored SIGTERM once (issue 20)
  local name=$1 limit=$2; shift 2
  CUDA_VISIBLE_DEVICES=0 timeout -k 15 "$limit" python3 -m pytest -q -p no:cacheprovider -W ignore --durations=12 "$@" \
    > "$OUT/$name.log" 2>&1
  echo "rc=$?"; grep -A 14 "slowest" "$OUT/$name.log"; tail -3 "$OUT/$name.log"; grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | head
}
for part in "$@"; do
  echo "== $part"
  case $part in
    tests)
      # the CUDA-graphs training test compiles two runs cold and needs a call of its own: the graphs part;
      # the selective scan's and the training tests are the scantests part (together they overran 360 s cold)
      run_tests tests ${TESTS_LIMIT:-400} ${TESTS:-tests/ops/test_conv3d.py \
        tests/pretrain/test_mambamim.py::test_no_leak_on_cuda_fast_paths tests/ops/test_toki.py tests/ops/test_block_copy.py \
        tests/pretrain/test_mambamim.py::test_no_leak_on_cuda_under_every_switch} ;;
    scantests)
      run_tests scantests ${SCAN_LIMIT:-400} tests/ops/test_selective_scan_triton.py tests/engine/test_cuda_training.py \
        --deselect tests/engine/test_cuda_training.py::test_compiled_pretrain_with_cuda_graphs_on_cuda ;;
    toki)
      # TOKI's CUDA tests, then the forward (persistent kernel vs a launch per step, eager and graphed), fp32 and bf16
      CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${TOKI_LIMIT:-150} python3 -m pytest -q -p no:cacheprovider -W ignore \
        tests/ops/test_toki.py > $OUT/toki_tests.log 2>&1
      echo "rc=$?"; tail -2 $OUT/toki_tests.log; grep -E "^(FAILED|ERROR)" $OUT/toki_tests.log | head
      for dt in fp32 bf16; do
        CUDA_VISIBLE_DEVICES=0 timeout -k 5 60 python3 benchmarks/bench_toki.py --dtype $dt > $OUT/toki_$dt.log 2>&1
        echo "rc=$?"; grep "bit-identical" $OUT/toki_$dt.log; tail -13 $OUT/toki_$dt.log
      done ;;
    split)
      # the selective scan with sequences split across programs: its CUDA tests, then 1, 2, ... segments
      run_tests split_tests ${SPLIT_LIMIT:-200} tests/ops/test_selective_scan_triton.py
      CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SPLIT_BENCH_LIMIT:-240} python3 benchmarks/bench_selective_scan.py \
        ${SPLIT_ARGS:---split} > $OUT/split.log 2>&1; echo "rc=$?"; grep "^|" $OUT/split.log ;;
    scanab)
      # forward and forward + backward at SCAN_LENGTHS: this tree, then .old/src (a tree carried for comparison)
      for tree in src .old/src; do
        [ -d "$tree" ] || continue
        echo "-- $tree"
        PYTHONPATH=/tmp/site:$PWD/$tree TRITON_CACHE_DIR=/tmp/tc_${tree//\//_} CUDA_VISIBLE_DEVICES=0 \
          timeout -k 5 ${SCANAB_LIMIT:-90} python3 benchmarks/bench_selective_scan.py --no-ref \
          --lengths ${SCAN_LENGTHS:-1728 8192} > "$OUT/scanab_${tree//\//_}.log" 2>&1
        echo "rc=$?"; grep "^| [0-9]" "$OUT/scanab_${tree//\//_}.log"
      done ;;
    graphs)
      CUDA_VISIBLE_DEVICES=0 timeout -k 15 ${GRAPHS_LIMIT:-540} python3 -m pytest -q -s -p no:cacheprovider -W ignore \
        tests/engine/test_cuda_training.py::test_compiled_pretrain_with_cuda_graphs_on_cuda > $OUT/graphs.log 2>&1
      echo "rc=$?"; grep -E "weights:|passed|failed|Error" $OUT/graphs.log | tail -5 ;;
    roofline)
      ( cd benchmarks && CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${ROOF_LIMIT:-150} python3 roofline.py --rows ${ROOF_ROWS:-10} ${ROOF_ARGS:-} \
        > $OUT/roofline.log 2>&1 ); grep -v -i warn $OUT/roofline.log | tail -14 ;;
    pretrain)
      CUDA_VISIBLE_DEVICES=0 timeout ${PRE_LIMIT:-560} python3 benchmarks/bench_steps.py --only pretrain --variants ${PRE_VARIANTS:-4 6 7} --iters 8 \
        > $OUT/bench_pretrain.log 2>&1; grep "^\[row\]\|^\[mem\]" $OUT/bench_pretrain.log ;;
    finetune)
      CUDA_VISIBLE_DEVICES=0 timeout 420 python3 benchmarks/bench_steps.py --only finetune infer toki --variants ${FT_VARIANTS:-3} \
        --iters 6 > $OUT/bench_finetune.log 2>&1; grep "^\[row\]\|TOKI" $OUT/bench_finetune.log ;;
    profile)
      CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/profile_modules.py > $OUT/profile.log 2>&1
      quiet < $OUT/profile.log | tail -75 ;;
    profstep)
      CUDA_VISIBLE_DEVICES=0 timeout ${PROF_LIMIT:-240} python3 benchmarks/profile_pretrain.py --channels-last ${PROF_ARGS:-} \
        --rows 40 > $OUT/profstep.log 2>&1; quiet < $OUT/profstep.log | tail -48 ;;
    conv)
      CUDA_VISIBLE_DEVICES=0 timeout ${CONV_LIMIT:-300} python3 benchmarks/bench_conv3d.py ${CONV_ARGS:-} > $OUT/conv.log 2>&1
      grep "^|" $OUT/conv.log | tail -20 ;;
    unmeasured)
      # what the fourth session left unmeasured: memory budget, the CLI's compiled inference
      CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/bench_steps.py --only pretrain --variants 4 8 --iters 8 \
        > $OUT/bench_budget.log 2>&1; grep "^\[row\]" $OUT/bench_budget.log
      CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_steps.py --only infer --variants 3 5 --iters 6 \
        > $OUT/bench_segmenter.log 2>&1; grep "^\[row\]" $OUT/bench_segmenter.log ;;
    cli)
      W=/tmp/w; rm -rf $W; mkdir -p $W
      ( cd $W && python3 -m mambamim data synth --out raw --num 3 --seed 0 >/dev/null \
        && python3 -m mambamim data prepare --input raw --out cache --no-progress --min-size 64 >/dev/null \
        && CUDA_VISIBLE_DEVICES=0 timeout 280 python3 -m mambamim pretrain --data cache --out pt --size tiny --crop 64 \
             --batch-size 4 --num-crops 2 --steps 6 --workers 2 --no-progress --compile --device cuda > $OUT/cli.log 2>&1
        echo "pretrain rc=$?"; quiet < $OUT/cli.log | tail -4 ) ;;
    engine)
      # median sec_per_step of the steps that are neither the first of an epoch nor step 2
      W=/tmp/we; rm -rf $W; mkdir -p $W
      ( cd $W && python3 -m mambamim data synth --out raw --num 8 --seed 0 >/dev/null \
        && python3 -m mambamim data prepare --input raw --out cache --no-progress --min-size 96 >/dev/null
        A="--data cache --size base --crop 96 --batch-size 8 --num-crops 4 --steps 16 --log-every 1 --workers 4 --no-progress --vis-every 0 --compile --device cuda ${ENGINE_EXTRA:-}"
        for g in ${ENGINE_RUNS:---cuda-graphs --no-cuda-graphs}; do
          CUDA_VISIBLE_DEVICES=0 timeout -s KILL ${ENGINE_LIMIT:-270} python3 -m mambamim pretrain --out run$g $A \
            $([ $g = --cuda-graphs ] && echo --cuda-graphs) > $OUT/engine$g.log 2>&1
          # peak_mem_gib: the first row holds compilation; under CUDA graphs the second row the recording
          python3 -c "import csv, statistics, sys; r = list(csv.DictReader(open(sys.argv[1]))); \
s = [float(x['sec_per_step']) for i, x in enumerate(r) if i > 1 and r[i - 1]['epoch'] == x['epoch']]; \
m = [float(x['peak_mem_gib']) for x in r[1:] if x.get('peak_mem_gib')]; \
print(sys.argv[2], 'median', round(statistics.median(s), 4), 'over', len(s), 'steps; peak after compile', \
max(m) if m else '-', 'GiB; reserved', r[-1].get('reserved_gib', '-'), 'GiB')" run$g/metrics.csv "$g"
        done ) ;;
    audit)
      W=/tmp/wa; rm -rf $W; mkdir -p $W
      ( cd $W && python3 -m mambamim data synth --out raw --num 4 --seed 0 >/dev/null \
        && python3 -m mambamim data prepare --input raw --out cache --no-progress --min-size 96 >/dev/null
        CUDA_VISIBLE_DEVICES=0 timeout -s KILL ${AUDIT_LIMIT:-150} python3 $OLDPWD/benchmarks/sync_audit.py -- pretrain \
          --data cache --out run --size base --crop 96 --batch-size 8 --num-crops 4 --steps 7 --workers 2 --no-progress \
          --vis-every 0 --device cuda ${AUDIT_ARGS:-} > $OUT/audit.log 2>&1
        grep -A 30 "steps audited" $OUT/audit.log || tail -20 $OUT/audit.log ) ;;
    ddp)
      for n in 1 2; do
        timeout 120 torchrun --standalone --nproc_per_node $n benchmarks/bench_ddp.py --steps 12 --warmup 4 \
          --append $OUT/ddp.txt > $OUT/ddp$n.log 2>&1; grep "^world" $OUT/ddp$n.log
      done ;;
    *) echo "unknown part $part" ;;
  esac
done
