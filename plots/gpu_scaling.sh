#!/bin/bash
# GPU scaling table of README: each config trains 6 updates; prints one line per config (plots/logs/gpu_scaling.log).
# Usage, from the repo root on a CUDA machine: bash plots/gpu_scaling.sh   (run dirs go to $OUT/gpu or /tmp/gpu)
set -u
python3 -c "import gymnasium, popgym" || exit 1  # needs requirements.txt installed
OUTD=${OUT:-/tmp}/gpu; mkdir -p $OUTD
echo "# device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) CPUs, torch $(python3 -c 'import torch;print(torch.__version__)'); commit $(git rev-parse --short HEAD 2>/dev/null)"
run() {  # name N extra...
  name=$1; N=$2; shift 2
  python3 gwt_ib.py --num-envs $N --total-timesteps $((N*256*6)) --eval-every 0 --eval-episodes 8 --progress false \
    --save-plot false --device cuda --out-dir $OUTD --run-name $name "$@" > $OUTD/$name.log 2>&1 || { echo "$name FAILED"; tail -5 $OUTD/$name.log; return; }
  python3 - $OUTD/$name $name $N "$*" <<'PY'
import json, sys
d, name, N, extra = sys.argv[1:]
rows = [json.loads(l) for l in open(d + "/metrics.jsonl")]
s = json.load(open(d + "/summary.json"))
r = rows[-1]; b = int(N) * 256
print(f"{name} N={N} {extra} | last-update {b/(r['rollout_s']+r['update_s']):,.0f} steps/s (rollout {b/r['rollout_s']:,.0f}, update {b/r['update_s']:,.0f}) end-to-end {s['steps_per_s']:,.0f} ratio0_maxdev {max(x['ratio0_maxdev'] for x in rows):.2e}")
PY
}
for N in 16 64 256 512 1024; do run sync$N $N; done
for N in 64 256 512 1024 2048 4096; do run w$N $N --env-workers 16; done
