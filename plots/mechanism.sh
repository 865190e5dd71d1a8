#!/bin/bash
# Does memory matter, and does the gate? GWT-IB (defaults), a plain GRU (--force-c 1) and a memoryless agent on two
# POPGym memory tasks, 3 seeds, 500k env steps each, all runs in parallel with one torch thread each (needs ~18 cores
# to finish in minutes). Run dirs go to ${OUT:-plots}/mechanism; summarize with
#   python plots/sweep.py report --out plots/mechanism
set -u
D=${OUT:-plots}/mechanism; mkdir -p "$D"
for env in popgym-CountRecallEasy-v0 popgym-RepeatPreviousEasy-v0; do
  for v in "gwt_ib:" "no_gate:--force-c 1.0" "memoryless:--memoryless true"; do
    for s in 0 1 2; do
      OMP_NUM_THREADS=1 python3 gwt_ib.py --env-id $env --seed $s --total-timesteps 500000 --device cpu \
        --torch-threads 1 --progress false --out-dir "$D" --run-name "${env}__${v%%:*}__s$s" ${v#*:} \
        > "$D/${env}__${v%%:*}__s$s.log" 2>&1 &
    done
  done
done
wait
grep -h "^run:" "$D"/*.log
