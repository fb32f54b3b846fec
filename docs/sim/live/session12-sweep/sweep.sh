#!/bin/bash
cd /work/main
for w in "M-M:poisson:rate=3.4:n=600" "L-L:poisson:rate=1.1:n=500" "M-M:gamma:rate=2.9:cv=4:n=600"; do
  for s in 0 1 2 3 4; do
    tag=$(echo "$w" | tr ':=' '__')-s$s
    nice -n 10 timeout 600 .venv/bin/llumnix sim live --predict-only --workload "$w" --seed $s --out /tmp/live/sw/$tag > /dev/null 2> /tmp/live/sw-$tag.err
    echo "$w seed $s: $(tail -1 /tmp/live/sw-$tag.err)" >> /tmp/live/sweep.txt
  done
done
echo done >> /tmp/live/sweep.txt
