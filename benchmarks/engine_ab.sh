#!/usr/bin/env bash
# The engine's own training step, two versions of the code side by side in one device call (A = BEFORE,
# B = this tree): `mambamim pretrain` and `mambamim finetune` of HyMamba base, 96^3 crops, batch 8, eager,
# the default precision (bf16 on CUDA), runs interleaved A B A B. Prints the median sec_per_step of the
# rows after the first two (start-up and the first cuDNN choices) and the peak memory.
#
#   BEFORE=.snap/src bash benchmarks/engine_ab.sh          # (device tool: carry [".whl", ".snap"])
#
# Expects the wheels of monai, nibabel, pydicom and tqdm in .whl/ (see the device README).
set -u
BEFORE=${BEFORE:?BEFORE=path/to/the/other/src}
STEPS=${STEPS:-16} SIZE=${SIZE:-base} CROP=${CROP:-96} DEVICE=${DEVICE:-cuda}   # smaller for a CPU smoke run
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
HERE=$PWD; A=$(cd "$BEFORE" && pwd); B=$HERE/src
nvidia-smi -L 2>/dev/null
W=/tmp/engine_ab; rm -rf $W; mkdir -p $W; cd $W
PYTHONPATH=/tmp/site:$B python3 -m mambamim data synth --out raw --num 8 --seed 0 >/dev/null
PYTHONPATH=/tmp/site:$B python3 -m mambamim data prepare --input raw --out cache --no-progress --min-size $CROP >/dev/null
COMMON="--data cache --size $SIZE --crop $CROP --batch-size 8 --num-crops 4 --log-every 1 --workers 4 --no-progress --device $DEVICE"
median() {  # metrics.csv label
  python3 -c "import csv, statistics, sys; r = [x for x in csv.DictReader(open(sys.argv[1])) if x.get('phase', 'train') == 'train' and x.get('sec_per_step')]; \
s = [float(x['sec_per_step']) for x in r[2:]]; m = [float(x['peak_mem_gib']) for x in r[1:] if x.get('peak_mem_gib')]; \
print(f'{sys.argv[2]:<22} median {statistics.median(s):.4f} s over {len(s)} steps; peak {max(m) if m else 0:.2f} GiB')" "$1" "$2"
}
for round in 1 2; do
  for side in A B; do
    src=$A; [ $side = B ] && src=$B
    PYTHONPATH=/tmp/site:$src timeout -s KILL 150 python3 -m mambamim pretrain --out pre$side$round $COMMON \
      --steps $STEPS --vis-every 0 > $OUT/pre$side$round.log 2>&1 || tail -5 $OUT/pre$side$round.log
    median pre$side$round/metrics.csv "pretrain $side round $round"
    PYTHONPATH=/tmp/site:$src timeout -s KILL 150 python3 -m mambamim finetune --out ft$side$round $COMMON \
      --iterations $STEPS --val-every 0 --fold -1 > $OUT/ft$side$round.log 2>&1 || tail -5 $OUT/ft$side$round.log
    median ft$side$round/metrics.csv "finetune $side round $round"
  done
done
