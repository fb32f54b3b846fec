#!/bin/bash
# Session 17: trees alternated on one host, the workload (200 M-M requests, Poisson 4 req/s, lengths capped at
# 1,024), llumnix only, one repeat per invocation. Each tree from `git archive --prefix=pyllumnix/ <rev>` into
# /tmp/s17/snap<T>, on PYTHONPATH:
#   B = 4a6c4b4 (session start), F = c663aef (framed Dispatch), G = 3b5f2ca (+ framed AddRequest),
#   H = 7fe5ccf (G after review), I = 4260a3f (the tree #20 was filed against).
# Rounds: TREES="F B" N=2 (F1 B1 F2 B2), TREES="G B" FROM=3 N=4, TREES="H B I" FROM=5 N=7.
cd /work/main
W="M-M:poisson:rate=4:n=200:len_max=1024"
mkdir -p /tmp/s17/ab
for i in $(seq ${FROM:-1} ${N:-2}); do
  for t in ${TREES:-F B}; do
    echo "start $t$i $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s17/ab/progress.txt
    PYTHONPATH=/tmp/s17/snap$t .venv/bin/python -m pyllumnix.tools.cli bench peers --systems llumnix --workload "$W" \
        --total-blocks 792 --repeats 1 --json /tmp/s17/ab/$t$i.json > /tmp/s17/ab/$t$i.out 2> /tmp/s17/ab/$t$i.err
    echo "end $t$i rc=$? $(date -u +%H:%M:%S)" >> /tmp/s17/ab/progress.txt
  done
done
