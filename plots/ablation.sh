#!/bin/bash
# What in the gate matters, and does the budget hold? GWT-IB with each --episode-start-td (max: the default, zero,
# carry), with the budget as a constraint (--ib-loss constraint), a plain GRU (--force-c 1) and a memoryless agent on
# four POPGym Easy tasks, 3 seeds, 500k env steps; then GateCheck's labelled runs: a plain GRU on CartPole-v1 (500k,
# should PASS) and agents that cannot learn (--lr 0) on CartPole-v1 and CountRecallEasy (should FAIL). Every run in
# parallel with one torch thread. `bash plots/ablation.sh ablation` runs the first part (60 runs: ~12 min on 16
# cores), `bash plots/ablation.sh labels` the second (23 runs, 7 of them at 500k), `bash plots/ablation.sh parts` the
# swapped parts on the same tasks and seeds (36 runs into the same folder): a plain LSTM (--memory lstm --force-c 1),
# GWT-IB with an LSTM memory, and GWT-IB whose gate gets no surprise (--surprise none); no argument: all three.
# Run dirs go to ${DEST:-plots}/ablation and ${DEST:-plots}/labels; summarize with
#   python plots/sweep.py report --out plots/ablation
#   python plots/sweep.py figures --out plots/ablation --timeline-variant start_max
#   python plots/sweep.py report --out plots/labels --dest plots/labels
set -u
launch() {  # out_dir "env ..." "seed ..." variant:flags ...
  local D=$1 envs=$2 seeds=$3; shift 3; mkdir -p "$D"
  for env in $envs; do for v in "$@"; do for s in $seeds; do
    OMP_NUM_THREADS=1 python3 gwt_ib.py --env-id "$env" --seed $s --device cpu --torch-threads 1 --progress false \
      --save-plot false --out-dir "$D" --run-name "${env}__${v%%:*}__s$s" ${v#*:} > "$D/${env}__${v%%:*}__s$s.log" 2>&1 &
  done; done; done
}
O=${DEST:-plots}
if [ "${1:-ablation}" = ablation ] || [ $# = 0 ]; then
  launch "$O/ablation" "popgym-CountRecallEasy-v0 popgym-RepeatFirstEasy-v0 popgym-RepeatPreviousEasy-v0
    popgym-PositionOnlyCartPoleEasy-v0" "0 1 2" "start_max:--episode-start-td max --ib-loss sq" \
    "constraint:--episode-start-td max --ib-loss constraint" "start_carry:--episode-start-td carry --ib-loss sq" \
    "no_gate:--force-c 1.0" "memoryless:--memoryless true"
fi
if [ "${1:-parts}" = parts ] || [ $# = 0 ]; then
  launch "$O/ablation" "popgym-CountRecallEasy-v0 popgym-RepeatFirstEasy-v0 popgym-RepeatPreviousEasy-v0
    popgym-PositionOnlyCartPoleEasy-v0" "0 1 2" "lstm:--memory lstm --force-c 1.0" "gwt_lstm:--memory lstm" \
    "surprise_none:--surprise none"
fi
if [ "${1:-labels}" = labels ] || [ $# = 0 ]; then
  launch "$O/labels" "CartPole-v1" "0 1 2 42" "no_gate:--force-c 1.0"
  launch "$O/labels" "popgym-CountRecallEasy-v0" "0 1 2" "lr0:--lr 0"
  launch "$O/labels" "CartPole-v1 popgym-CountRecallEasy-v0" "0 1 2 3 4 5 6 7" "lr0_8upd:--lr 0 --total-timesteps 32768"
fi
wait
grep -h "^run:" "$O"/ablation/*.log "$O"/labels/*.log 2>/dev/null
