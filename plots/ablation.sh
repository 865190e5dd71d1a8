#!/bin/bash
# What should the router see at an episode's first step? GWT-IB with each --episode-start-td (zero, carry, max),
# a plain GRU (--force-c 1) and a memoryless agent on four POPGym Easy tasks, 3 seeds, 500k env steps, plus
# the default (start max) against the GRU on CountRecall at 1M. Every run in parallel with one torch thread
# (66 runs: ~15 min on 16 cores).
# Run dirs go to ${OUT:-plots}/ablation{,_1m}; summarize with
#   python plots/sweep.py report --out plots/ablation
#   python plots/sweep.py report --out plots/ablation_1m --dest plots/ablation_1m
set -u
V=("start_zero:--episode-start-td zero" "start_carry:--episode-start-td carry" "start_max:--episode-start-td max"
   "no_gate:--force-c 1.0" "memoryless:--memoryless true")
launch() {  # out_dir steps env...  (the variants: $V)
  local D=$1 steps=$2; shift 2; mkdir -p "$D"
  for env in "$@"; do for v in "${V[@]}"; do for s in 0 1 2; do
    OMP_NUM_THREADS=1 python3 gwt_ib.py --env-id "$env" --seed $s --total-timesteps $steps --device cpu \
      --torch-threads 1 --progress false --out-dir "$D" --run-name "${env}__${v%%:*}__s$s" ${v#*:} \
      > "$D/${env}__${v%%:*}__s$s.log" 2>&1 &
  done; done; done
}
launch "${OUT:-plots}/ablation" 500000 popgym-CountRecallEasy-v0 popgym-RepeatFirstEasy-v0 \
  popgym-RepeatPreviousEasy-v0 popgym-PositionOnlyCartPoleEasy-v0
V=("start_max:--episode-start-td max" "no_gate:--force-c 1.0")
launch "${OUT:-plots}/ablation_1m" 1000000 popgym-CountRecallEasy-v0
wait
grep -h "^run:" "${OUT:-plots}"/ablation*/*.log
