#!/bin/bash
# Xeon host: what calibrate() picks at 1 thread, and the speed of the current code then (solo and 16 in parallel)
# Usage, from the repo root (requirements installed): bash plots/cpu_1thread_check.sh   (log: plots/logs/xeon_1thread.log)
grep -o -w -E "avx512f|avx2" /proc/cpuinfo | sort | uniq -c
OMP_NUM_THREADS=1 python3 -c "
import sys, torch; sys.path.insert(0, '.'); import gwt_ib as G
k = G.cell_kernel(); print('threads', torch.get_num_threads(), 'kernel gemm chosen:', k.gemm)"
run() { python3 gwt_ib.py --total-timesteps 49152 --torch-threads 1 --progress false --save-plot false --eval-every 0 --device cpu --out-dir /tmp/d --run-name $1 > /tmp/d_$1.log 2>&1
  python3 -c "
import json; r=[json.loads(l) for l in open('/tmp/d/$1/metrics.jsonl')][2:]
print('$1 rollout %.3f update %.3f s/upd ratio0 %g' % (sum(x['rollout_s'] for x in r)/len(r), sum(x['update_s'] for x in r)/len(r), max(x['ratio0_maxdev'] for x in r)))"; }
mkdir -p /tmp/d; run solo; for i in $(seq 1 16); do run par$i & done; wait
