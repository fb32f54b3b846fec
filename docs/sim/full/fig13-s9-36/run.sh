#!/bin/bash
# Session 9 Fig. 13 at 36 req/s on the adopted profile: snapshot of 54ff083 (= 098618c's code), nice -n 19, one at a time.
for s in 0 1 2 3 4; do for mode in ignored aware; do
  if [ $mode = ignored ]; then flag=--no-priorities; name=priorities-ignored; else flag=--priorities; name=priority-aware; fi
  out=/tmp/s9/out/fig13/seed$s-$name
  [ -f $out/summary.json ] && continue
  cd /tmp && PYTHONPATH=/tmp/s9/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 16 \
    --workload S-S:gamma:rate=36:cv=4:n=10000:priority_share=0.1 --policy llumnix $flag --split-steps \
    --migrate-out-threshold 3 --seed $s --out $out > /tmp/s9/out/fig13-log-$s-$mode.txt 2>&1
done; done
echo done > /tmp/s9/out/FIG13_DONE
