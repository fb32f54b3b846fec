#!/bin/bash
# Session 16: trees alternated on one host, the workload (200 M-M requests, Poisson 4 req/s, lengths capped at
# 1,024), llumnix only, one repeat per invocation. Each tree from `git archive --prefix=pyllumnix/ <rev>` into
# /tmp/s16/snap<T>, on PYTHONPATH:
#   I = 4260a3f (the tree #20 was filed against), C = 1b1b301 (session start), N = ae3f4de (this session's two changes),
#   R = C with the llumlets' --load-interval-ms default 100 instead of 50 (exploratory: what the load reports cost).
# Rounds: TREES="I C" N=3 (I1 C1 .. I3 C3), TREES="R C" FROM=4 N=5, TREES="N C I" FROM=6 N=7.
cd /work/main
W="M-M:poisson:rate=4:n=200:len_max=1024"
for i in $(seq ${FROM:-1} ${N:-3}); do
  for t in ${TREES:-I C}; do
    echo "start $t$i $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s16/ic/progress.txt
    PYTHONPATH=/tmp/s16/snap$t .venv/bin/python -m pyllumnix.tools.cli bench peers --systems llumnix --workload "$W" \
        --total-blocks 792 --repeats 1 --json /tmp/s16/ic/$t$i.json > /tmp/s16/ic/$t$i.out 2> /tmp/s16/ic/$t$i.err
    echo "end $t$i rc=$? $(date -u +%H:%M:%S) $(head -1 /tmp/s16/ic/$t$i.err | cut -c1-200)" >> /tmp/s16/ic/progress.txt
  done
done
