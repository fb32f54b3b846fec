#!/bin/bash
# Session 9 exploratory re-fit WITH the floor (decode_min_batch 8): INFaaS++ only, 10,000 requests, Fig. 11 settings.
# /tmp/refit/<cfg>/src/pyllumnix = `git archive --prefix=pyllumnix/ 20a21ff` with only decode_a_ms and
# A10_KERNEL_EFFICIENCY changed (sed; cfg = a<a>-e<eff>). Jobs ("cfg name workload threshold seed", one a line) are
# read from the queue file given as $1 and taken in order by two workers (flock), i.e. at most two simulations at once.
# Queue: a control (a1.25-e0.77 ss35 s0), then the grid a0.75/a1.0 x e0.77/e0.80 (M-M s1 and S-S s0 first, then S-L
# s0-1, M-M s0/s2, S-S s1, L-L s0-1), then the refinement a1.1-e0.80, a1.1-e0.77, a1.5-e0.80 (appended while the grid
# ran, L-L last); the order and finish times of every run are in progress.txt. Workloads and thresholds:
#   ss35 S-S:poisson:rate=35:n=10000 3 | mm77 M-M:poisson:rate=7.7:n=10000 10 | ll29 L-L:poisson:rate=2.9:n=10000 3
#   sl425 S-L:poisson:rate=4.25:n=10000 10          (seeds 0-2 for mm77, 0-1 for the others)
Q=$1
run() { # cfg name workload threshold seed
  out=/tmp/refit/out/$1/$2-s$5
  [ -f $out/summary.json ] && return
  mkdir -p /tmp/refit/log
  cd /tmp && PYTHONPATH=/tmp/refit/$1/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 16 --workload $3 \
    --policy infaas++ --no-migration --split-steps --migrate-out-threshold $4 --seed $5 --out $out \
    > /tmp/refit/log/$1-$2-s$5.txt 2>&1
  date -u +"%H:%M:%S $1 $2 s$5 rc=$?" >> /tmp/refit/progress.txt
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
echo done >> /tmp/refit/progress.txt
