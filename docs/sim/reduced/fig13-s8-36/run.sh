#!/bin/bash
for s in 0 1 2 3 4; do for mode in ignored aware; do
  if [ $mode = ignored ]; then flag=--no-priorities; name=priorities-ignored; else flag=--priorities; name=priority-aware; fi
  PYTHONPATH=/tmp/f13/src nice -n 10 /work/main/.venv/bin/llumnix sim --instances 16 \
    --workload S-S:gamma:rate=36:cv=4:n=10000:priority_share=0.1 --policy llumnix $flag --split-steps \
    --migrate-out-threshold 3 --seed $s --out /tmp/f13/out/seed$s-$name > /tmp/f13/log-$s-$mode.txt 2>&1
done; done
echo done > /tmp/f13/DONE
