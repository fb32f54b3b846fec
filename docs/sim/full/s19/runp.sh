#!/bin/bash
# cfg name workload threshold seed   (queue file $1, two workers)
Q=$1
run() {
  out=/tmp/s19/out/$1-$6/$2-s$5
  [ -f $out/summary.json ] && return
  mkdir -p /tmp/s19/log
  cd /tmp && PYTHONPATH=/tmp/s19/$1/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 16 --workload $3 \
    --policy $6 $7 --split-steps --migrate-out-threshold $4 --seed $5 --out $out \
    > /tmp/s19/log/$1-$2-s$5.txt 2>&1
  date -u +"%H:%M:%S $1 $2 s$5 rc=$?" >> /tmp/s19/progress.txt
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
echo done >> /tmp/s19/progress.txt
