#!/usr/bin/env bash
# One GPU device call of the replication, at most 9 minutes (one H200 or H100, 16 CPU cores):
#
#   bash benchmarks/replication/run_gpu.sh 1     # data + arms scratch, toki75, learnable75
#   bash benchmarks/replication/run_gpu.sh 2     # data + arms toki50, toki90, dense75
#   bash benchmarks/replication/run_gpu.sh 3     # data + the four ablation arms (run it twice, warm machine)
#   JOBS=8 bash benchmarks/replication/run_gpu.sh all --set pretrain_steps=500 finetune_iterations=300
#                                                 # every arm in one call, shorter schedules
#
# (device tool: carry [".whl"], timeout_s 560). Each part is self-contained: it regenerates the data
# from fixed seeds (or reuses it on a warm machine), runs its jobs 6 at a time and stops them with a
# checkpoint before BUDGET seconds; the same command again resumes (warm machine) or restarts the
# unfinished jobs (fresh machine; finished evaluations carried in benchmarks/replication/carry/*.tar.gz
# are kept). Leaves $OUT/replication-gpu-part<N>.tar.gz (results, configs, logs; no checkpoints) and
# $OUT/replicate-part<N>.log. Extra arguments go to the train stage (e.g. --set finetune_iterations=600).
set -u
PART=${1:?usage: run_gpu.sh 1|2|all [train options]}; shift
BUDGET=${BUDGET:-520}          # seconds for the whole script
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed (carry .whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L; nproc
R=benchmarks/replication
D="python3 $R/replicate.py --scale gpu --part $PART ${ROOT:+--root $ROOT}"   # ROOT: runs folder outside the tree
for p in $R/carry/*.tar.gz; do [ -f "$p" ] && $D unpack --pack "$p"; done
{
  $D --device cuda data || exit 1
  LEFT=$(( BUDGET - ($(date +%s) - T0) - 60 ))   # 45 s for the jobs to checkpoint, 15 s to collect and pack
  echo "train deadline: $LEFT s"
  $D --device cuda --deadline $LEFT ${JOBS:+--jobs $JOBS} train "$@"
  echo "train rc=$?"
  $D collect
} 2>&1 | tee "$OUT/replicate-part$PART.log"
$D pack --pack "$OUT/replication-gpu-part$PART.tar.gz"
$D status
echo "run_gpu.sh part $PART: $(( $(date +%s) - T0 )) s"
