#!/bin/bash
# Trees alternated on one host, the issue's workload (200 M-M requests, Poisson 4 req/s, lengths capped at 1,024),
# llumnix only, one repeat per invocation: rounds FROM..N, in each round every tree of TREES once, in that order.
# Tree T is a `git archive --prefix=pyllumnix/ <rev>` unpacked into $SNAPS/snap<T>, put on PYTHONPATH; results go
# to $OUT/<T><round>.{json,out,err}, start and end times to $OUT/progress.txt. Each session's run.sh names its trees.
set -u
cd "$(dirname "$0")/../.."
W="M-M:poisson:rate=4:n=200:len_max=1024"
mkdir -p "$OUT"
for i in $(seq "${FROM:-1}" "${N:-2}"); do
  for t in $TREES; do
    echo "start $t$i $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/progress.txt"
    PYTHONPATH="$SNAPS/snap$t" .venv/bin/python -m pyllumnix.tools.cli bench peers --systems llumnix --workload "$W" \
        --total-blocks 792 --repeats 1 --json "$OUT/$t$i.json" > "$OUT/$t$i.out" 2> "$OUT/$t$i.err"
    echo "end $t$i rc=$? $(date -u +%H:%M:%S) $(head -1 "$OUT/$t$i.err" | cut -c1-200)" >> "$OUT/progress.txt"
  done
done
