#!/bin/bash
# Session 19: Fig. 14 seeds 5-9 (session 9's settings, docs/sim/full/fig14-s9/run.sh and run2.sh), snapshot of 6f8e1ec
# (/tmp/s19/head/src), nice -n 19, two at once (queue file $1, one "point seed policy" a line).
Q=$1
run() { # point seed policy
  out=/tmp/s19/fig14/$1/seed$2-$3
  [ -f $out/summary.json ] && return
  extra=""; [ $3 = infaas++ ] && extra="--no-migration"
  case $1 in poisson25) wl=L-L:poisson:rate=2.5:n=3000;; cv*) wl=L-L:gamma:rate=2.0:cv=${1#cv}:n=3000;; esac
  cd /tmp && PYTHONPATH=/tmp/s19/head/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 8 --workload $wl \
    --policy $3 $extra --autoscale --min 1 --max 16 --scale-up 10 --scale-down 60 --scaling-warmup-s 100 \
    --drain-victim last --split-steps --migrate-out-threshold 3 --seed $2 --out $out > /tmp/s19/fig14/log-$1-s$2-$3.txt 2>&1
  date -u +"%H:%M:%S $1 s$2 $3 rc=$?" >> /tmp/s19/fig14/progress.txt
}
worker() {
  while true; do
    job=$(flock $Q.lock bash -c "head -n1 $Q; sed -i 1d $Q")
    [ -z "$job" ] && return
    run $job
  done
}
worker & p1=$!
worker & p2=$!
wait $p1 $p2
echo done >> /tmp/s19/fig14/progress.txt
