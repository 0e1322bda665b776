#!/usr/bin/env bash
# Sizing the CPU demo: runs `mambamim demo` variants concurrently on one GPU and prints both arms' mean
# test Dice per variant. What a run learns per iteration does not depend on the device (bf16 autocast here,
# fp32 on the CPU), so this picks the settings; the CPU timing is measured on the CPU (benchmarks/RESULTS.md).
#   bash benchmarks/demo_sweep.sh            # the variants below; SWEEP="name:args;name:args" replaces them
# Expects the wheels of monai, nibabel, pydicom, tqdm in .whl/ (see the device README).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/sweep; mkdir -p $W
nvidia-smi -L
DEFAULT="base:;ft600:--finetune-iterations 600;lr1e2:--set lr_finetune=0.01;small:--size small;pt1000:--pretrain-steps 1000;\
train5:--num-train 5;seed1:--seed 1;mr06:--set mask_ratio=0.6;long:--finetune-iterations 600 --pretrain-steps 1000;\
sp45:--set spacing=4.5 --crop 48"
IFS=';' read -ra VARIANTS <<< "${SWEEP:-$DEFAULT}"
for v in "${VARIANTS[@]}"; do
  name=${v%%:*}; args=${v#*:}
  ( timeout ${SWEEP_LIMIT:-500} python3 -m mambamim demo --out $W/$name --device cuda --no-progress $args \
      > $OUT/$name.log 2>&1; echo "$name rc=$?" ) &
done
wait
for v in "${VARIANTS[@]}"; do
  name=${v%%:*}
  python3 - "$W/$name" "$name" "${v#*:}" <<'PY'
import json, sys
from pathlib import Path
run, name, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    d = json.loads((run / "demo.json").read_text())
except OSError:
    print(f"[sweep] {name} ({args}): no demo.json"); sys.exit()
cls = {}
for arm in ("scratch", "pretrained"):
    s = json.loads((run / f"eval_{arm}" / "summary.json").read_text())
    cls[arm] = {k: round(v["dice_mean"], 3) for k, v in s["classes"].items()}
print(f"[sweep] {name} ({args}): {json.dumps({k: round(v, 4) for k, v in d['mean_dice'].items()})} "
      f"total {d['seconds']['total']} s | {d['verdict']}")
print(f"[class] {name} " + json.dumps(cls))
PY
done | tee $OUT/sweep.txt
