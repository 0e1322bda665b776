#!/usr/bin/env bash
# One device call (about 6 minutes): what the replication's building blocks cost on the GPU, to size
# the `--scale gpu` preset of replicate.py: data stage wall time, sec/step of tiny and small HyMamba at
# 64^3 alone, and 6 fine-tuning processes at once (throughput, and a rough look at three learning rates).
#   bash benchmarks/replication/calibrate.sh        (logs and metrics under $OUT)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/cal; rm -rf $W; mkdir -p $W; cd $W
nvidia-smi -L; nproc
SYN="--inplane-voxels 96 128 --inplane-spacing 2.5 3.5 --slice-spacing 3.0 5.0"
t0=$(date +%s)
python3 -m mambamim data synth --out raw_u --num 64 --unlabeled --seed 1000 --prefix pool --workers 16 $SYN
python3 -m mambamim data synth --out raw_l --num 10 --seed 0 --prefix lab --workers 10 $SYN
python3 -m mambamim data prepare --input raw_u --out cache_u --spacing 3 --min-size 64 --workers 16 --no-progress 2>&1 | tail -1
python3 -m mambamim data prepare --input raw_l --out cache_l --spacing 3 --min-size 64 --workers 10 --no-progress 2>&1 | tail -1
echo "[cal] data $(( $(date +%s) - t0 )) s"; du -sh cache_u cache_l
rows() { python3 - "$1" <<'PY'
import csv, sys
r = [x for x in csv.DictReader(open(sys.argv[1] + "/metrics.csv")) if x.get("train/sec_per_step") or x.get("sec_per_step")]
k = "train/sec_per_step" if "train/sec_per_step" in r[0] else "sec_per_step"
l = "train/loss" if "train/loss" in r[0] else "loss"
print("[cal]", sys.argv[1], "steps", r[-1]["step"], "sec/step", [round(float(x[k]), 4) for x in r], "loss", [round(float(x[l]), 4) for x in r])
PY
}
COMMON="--crop 64 --no-progress --device cuda --log-every 10"
for size in tiny small; do
  t=$(date +%s)
  timeout 150 python3 -m mambamim pretrain --data cache_u --out pt_$size --size $size --batch-size 8 --num-crops 4 --steps 80 \
    --workers 4 --lr 1e-3 --save-every 0 --vis-every 0 $COMMON > $OUT/pt_$size.log 2>&1; echo "[cal] pretrain $size rc=$? wall $(( $(date +%s) - t )) s"
  rows pt_$size
done
t=$(date +%s)
timeout 100 python3 -m mambamim finetune --data cache_l --out ft_small1 --size small --batch-size 4 --num-crops 2 --iterations 80 \
  --val-every 40 --fold 0 --num-folds 5 --workers 2 --lr 1e-3 $COMMON > $OUT/ft_small1.log 2>&1; echo "[cal] finetune small alone rc=$? wall $(( $(date +%s) - t )) s"
rows ft_small1; grep -h "validation mean Dice" $OUT/ft_small1.log | tail -2
# six at once: tiny and small at three learning rates, 400 iterations, validated at 200 and 400
t=$(date +%s); pids=""
for size in tiny small; do for lr in 3e-4 1e-3 3e-3; do
  timeout 240 python3 -m mambamim finetune --data cache_l --out ft6_${size}_$lr --size $size --batch-size 4 --num-crops 2 \
    --iterations 400 --val-every 200 --fold 0 --num-folds 5 --workers 2 --lr $lr --pretrained pt_$size/encoder.pt $COMMON \
    > $OUT/ft6_${size}_$lr.log 2>&1 & pids="$pids $!"
done; done
wait $pids; echo "[cal] six concurrent fine-tunes wall $(( $(date +%s) - t )) s"
for d in ft6_*; do rows $d; grep -h "validation mean Dice" $OUT/$d.log | tail -2; done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
