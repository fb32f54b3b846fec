#!/bin/bash
# Session 9 joint check: INFaaS++ only, 10k, Fig. 11 settings, snapshot of 54ff083 (decode_min_batch 8)
# /tmp/s9/src = `git archive 54ff083` (decode_min_batch = 8; code equal to 098618c); two queues at once.
run() { # name workload threshold seed
  out=/tmp/s9/out/joint/$1-s$4
  [ -f $out/summary.json ] && return
  cd /tmp && PYTHONPATH=/tmp/s9/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 16 --workload $2 --policy infaas++ \
    --no-migration --split-steps --migrate-out-threshold $3 --seed $4 --out $out > /tmp/s9/out/joint-log-$1-s$4.txt 2>&1
}
q1() {
run ll29 L-L:poisson:rate=2.9:n=10000 3 0
run mm77 M-M:poisson:rate=7.7:n=10000 10 0
run mm77 M-M:poisson:rate=7.7:n=10000 10 2
run ss35 S-S:poisson:rate=35:n=10000 3 1
}
q2() {
run ll29 L-L:poisson:rate=2.9:n=10000 3 1
run mm77 M-M:poisson:rate=7.7:n=10000 10 1
run ss35 S-S:poisson:rate=35:n=10000 3 0
}
q1 & p1=$!
q2 & p2=$!
wait $p1 $p2
echo done > /tmp/s9/out/JOINT_DONE
