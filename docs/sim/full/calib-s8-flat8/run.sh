#!/bin/bash
# Exploratory: llama-7b-a10 with the per-sequence cost flat up to 8 sequences (a * max(n, 8)); INFaaS++ only, 10k.
cd /tmp/llcal
run() { # name workload threshold seed
  out=/tmp/llcal/out/$1-s$4
  [ -f $out/summary.json ] && return
  PYTHONPATH=/tmp/llcal/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 16 --workload $2 --policy infaas++ \
    --no-migration --split-steps --migrate-out-threshold $3 --seed $4 --out $out > /tmp/llcal/log-$1-s$4.txt 2>&1
}
run ll32 L-L:poisson:rate=3.2:n=10000 3 0
run ll29 L-L:poisson:rate=2.9:n=10000 3 0
run mm77 M-M:poisson:rate=7.7:n=10000 10 1
run ss35 S-S:poisson:rate=35:n=10000 3 0
run ll29 L-L:poisson:rate=2.9:n=10000 3 1
run mm77 M-M:poisson:rate=7.7:n=10000 10 0
run mm77 M-M:poisson:rate=7.7:n=10000 10 2
echo done > /tmp/llcal/DONE
