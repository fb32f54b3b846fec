#!/bin/bash
# Session 19's simulation queue runner (session 9's refit/run.sh with the policy as two more fields). Each queue line:
#   <snapshot> <name> <workload spec> <migrate-out threshold> <seed> <policy> <--migration|--no-migration>
# runs `llumnix sim` on PYTHONPATH=/tmp/s19/<snapshot>/src (a `git archive` of 1345edc, 4cb7cb2 or 6f8e1ec with the
# patch of floor/, veto/ or selection/ applied) into /tmp/s19/out/<snapshot>-<policy>/<name>-s<seed>; two workers,
# nice -n 19. The floor's INFaaS++ runs used the same loop with the policy fixed (`infaas++ --no-migration`) and the
# output folder /tmp/s19/out/<snapshot>/. Finish times of every run: progress.txt.
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
