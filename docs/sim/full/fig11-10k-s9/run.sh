#!/bin/bash
# Session 9 Fig. 11: snapshot of 54ff083 (= 098618c's code), nice -n 19, two compare processes at once, --jobs 1 each.
run() { # trace
  out=/tmp/s9/out/fig11/$1
  [ -f $out/compare.json ] && return
  mkdir -p $out
  cd /tmp && PYTHONPATH=/tmp/s9/src nice -n 19 /work/main/.venv/bin/llumnix sim compare --scenario paper-fig11 --traces $1 \
    --policies llumnix --seeds 5 --requests 10000 --jobs 1 --out $out 2> $out/run.log > $out/stdout.txt
  date -u +"%H:%M:%S $1 done" >> /tmp/s9/out/fig11-progress.txt
}
qA() { run L-L; run S-S; run L-S; }
qB() { run M-M; run S-L; }
qA & pA=$!
qB & pB=$!
wait $pA $pB
echo done > /tmp/s9/out/FIG11_DONE
