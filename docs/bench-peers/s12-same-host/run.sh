#!/bin/bash
# Same host, same workload (the issue's: 200 M-M requests at 4 req/s, lengths capped at 1,024), the issue-era code
# (a7c6cfa) against HEAD, each from a git archive snapshot on PYTHONPATH; A B A B, one repeat per invocation... 
cd /work/main
W="M-M:poisson:rate=4:n=200:len_max=1024"
for i in 1 2; do
  for t in A B; do
    echo "start $t$i $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/mm/progress.txt
    PYTHONPATH=/tmp/snap$t .venv/bin/python -m pyllumnix.tools.cli bench peers --systems llumnix --workload "$W" --repeats 1 --json /tmp/mm/$t$i.json > /tmp/mm/$t$i.out 2> /tmp/mm/$t$i.err
    echo "end $t$i rc=$? $(date -u +%H:%M:%S)" >> /tmp/mm/progress.txt
  done
done
