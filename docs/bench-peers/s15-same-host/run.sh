#!/bin/bash
# Session 15: the issue-era code against later trees on one host, the M-M workload (200 requests, Poisson
# 4 req/s, lengths capped at 1,024), llumnix only, one repeat per invocation, the trees alternated.
#   I = 4260a3f: the tree #20 was filed against (bench peers just landed, no token-path change yet), run with ITS OWN
#       bench; its engine could not take 520 blocks ("a max_model_len request would never fit above the watermark"),
#       so every tree runs the profile's 792 blocks here.
#   B = b5e91be (this session's start), D = 22cc452 (framed streams), E = 66b786a (framed streams + review fixes +
#       idle wake-ups).
# Each tree from a `git archive --prefix=pyllumnix/ <rev>` snapshot in /tmp/s15/snap<T> on PYTHONPATH.
cd /work/main
W="M-M:poisson:rate=4:n=200:len_max=1024"
for i in $(seq 1 ${N:-1}); do
  for t in ${TREES:-I B E}; do
    echo "start $t$i $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s15/progress.txt
    PYTHONPATH=/tmp/s15/snap$t .venv/bin/python -m pyllumnix.tools.cli bench peers --systems llumnix --workload "$W" \
        --total-blocks ${BLOCKS:-792} --repeats 1 --json /tmp/s15/$t$i-${BLOCKS:-792}.json > /tmp/s15/$t$i.out 2> /tmp/s15/$t$i.err
    echo "end $t$i rc=$? $(date -u +%H:%M:%S)" >> /tmp/s15/progress.txt
  done
done
