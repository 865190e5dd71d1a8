#!/bin/bash
# GPU speed of gwt_ib.py at 1024 and 2048 envs (16 env-worker processes), alternated with another version of the
# trainer (e.g. the code before a change: git show REF:gwt_ib.py > /tmp/old_gwt_ib.py), and the env-only ceiling:
# the same sharded vector env stepped with random actions by the same workers, no model.
# Usage, from the repo root on a CUDA machine:  bash plots/gpu_speed.sh [OTHER_TRAINER.py] [REPS] [UPDATES]
# Each run trains UPDATES updates (default 6); prints end-to-end env steps/s and the last update's rollout/update split.
set -u
OTHER=${1:-}; REPS=${2:-2}; UPD=${3:-6}; OUTD=${OUT:-/tmp}/gpu_speed; mkdir -p "$OUTD"
[ -n "$OTHER" ] && cp "$OTHER" /tmp/old_gwt_ib.py && OTHER=/tmp/old_gwt_ib.py  # runs as the module old_gwt_ib
echo "# device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) CPUs, torch $(python3 -c 'import torch;print(torch.__version__)')"
run() {  # label trainer N rep
  name=$1_n$3_r$4
  python3 "$2" --num-envs $3 --env-workers 16 --total-timesteps $(($3*256*UPD)) --eval-every 0 --eval-episodes 8 \
    --progress false --save-plot false --device cuda --out-dir "$OUTD" --run-name "$name" > "$OUTD/$name.log" 2>&1 \
    || { echo "$name FAILED"; tail -5 "$OUTD/$name.log"; return; }
  grep "^note:" "$OUTD/$name.log"
  python3 - "$OUTD/$name" "$1" "$3" <<'PY'
import json, sys
d, label, N = sys.argv[1:]
rows = [json.loads(l) for l in open(d + "/metrics.jsonl")]
s, r = json.load(open(d + "/summary.json")), rows[-1]
print(f"{label:4s} N={N:5s} end-to-end {s['steps_per_s']:9,.0f} env steps/s | last update: rollout {r['rollout_s']:.2f} s, "
      f"update {r['update_s']:.2f} s | ratio0_maxdev {max(x['ratio0_maxdev'] for x in rows):.1e}")
PY
}
ceiling() {  # N: the env side alone, 256 steps after a warm-up of 16
  python3 - "$1" <<'PY'
import sys, time, numpy as np
import gwt_ib
N = int(sys.argv[1])
envs = gwt_ib.make_envs(gwt_ib.Cfg(num_envs=N), N, workers=16)
envs.reset(seed=0)
space = envs.single_action_space
acts = [np.stack([space.sample() for _ in range(N)]) for _ in range(8)]
for t in range(16):
    envs.step(acts[t % 8])
t0 = time.perf_counter()
for t in range(256):
    envs.step(acts[t % 8])
print(f"env  N={N:<5d} env-only ceiling {256 * N / (time.perf_counter() - t0):9,.0f} env steps/s (random actions, 16 workers)")
envs.close()
PY
}
for N in 1024 2048; do
  ceiling $N
  for rep in $(seq 1 $REPS); do
    run new gwt_ib.py $N $rep
    if [ -n "$OTHER" ]; then run old "$OTHER" $N $rep; fi
  done
done
