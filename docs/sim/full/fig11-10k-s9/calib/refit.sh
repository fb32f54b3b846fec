#!/bin/bash
# Session 9 re-fit sweep: floor 8, a = 1.25, eff (c and b together) changed; INFaaS++ only, 10k, Fig. 11 settings.
# /tmp/s9/src-e<eff> = `git archive 098618c` with `A10_KERNEL_EFFICIENCY = <eff>` (sed); run as `refit.sh 0.80`.
# Stopped after the five M-M / S-S points (the L-L point was cut short: the decision did not depend on it); 0.79 not run.
run() { # eff name workload threshold seed
  out=/tmp/s9/out/sweep/e$1/$2-s$5
  [ -f $out/summary.json ] && return
  cd /tmp && PYTHONPATH=/tmp/s9/src-e$1 nice -n 19 /work/main/.venv/bin/llumnix sim --instances 16 --workload $3 --policy infaas++ \
    --no-migration --split-steps --migrate-out-threshold $4 --seed $5 --out $out > /tmp/s9/out/sweep-log-e$1-$2-s$5.txt 2>&1
}
for e in $@; do
run $e mm77 M-M:poisson:rate=7.7:n=10000 10 1
run $e mm77 M-M:poisson:rate=7.7:n=10000 10 3
run $e mm77 M-M:poisson:rate=7.7:n=10000 10 4
run $e ss35 S-S:poisson:rate=35:n=10000 3 0
run $e ss35 S-S:poisson:rate=35:n=10000 3 1
run $e ll29 L-L:poisson:rate=2.9:n=10000 3 1
done
echo done > /tmp/s9/out/SWEEP_DONE
