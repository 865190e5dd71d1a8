#!/bin/bash
# GPU speed of gwt_ib.py at 1024 and 2048 envs (16 env-worker processes), optionally alternated with another
# version of the trainer (e.g. an older commit: git show REF:gwt_ib.py > /tmp/old_gwt_ib.py).
# Usage, from the repo root on a CUDA machine:  bash plots/gpu_speed.sh [OTHER_TRAINER.py] [REPS]
# Each run trains 6 updates; prints end-to-end env steps/s and the last update's rollout/update split.
set -u
OTHER=${1:-}; REPS=${2:-2}; OUTD=${OUT:-/tmp}/gpu_speed; mkdir -p "$OUTD"
echo "# device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) CPUs, torch $(python3 -c 'import torch;print(torch.__version__)')"
run() {  # label trainer N rep
  name=$1_n$3_r$4
  python3 "$2" --num-envs $3 --env-workers 16 --total-timesteps $(($3*256*6)) --eval-every 0 --eval-episodes 8 \
    --progress false --save-plot false --device cuda --out-dir "$OUTD" --run-name "$name" > "$OUTD/$name.log" 2>&1 \
    || { echo "$name FAILED"; tail -5 "$OUTD/$name.log"; return; }
  python3 - "$OUTD/$name" "$1" "$3" <<'PY'
import json, sys
d, label, N = sys.argv[1:]
rows = [json.loads(l) for l in open(d + "/metrics.jsonl")]
s, r, b = json.load(open(d + "/summary.json")), rows[-1], int(N) * 256
print(f"{label:4s} N={N:5s} end-to-end {s['steps_per_s']:9,.0f} env steps/s | last update: rollout {r['rollout_s']:.2f} s, "
      f"update {r['update_s']:.2f} s | ratio0_maxdev {max(x['ratio0_maxdev'] for x in rows):.1e}")
PY
}
for N in 1024 2048; do
  for rep in $(seq 1 $REPS); do
    run new gwt_ib.py $N $rep
    if [ -n "$OTHER" ]; then run old "$OTHER" $N $rep; fi
  done
done
