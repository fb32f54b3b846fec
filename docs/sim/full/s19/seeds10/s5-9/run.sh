#!/bin/bash
# Session 19: Fig. 11 seeds 5-9 (both policies), /tmp/s19/head/src = git archive of 6f8e1ec, nice -n 19, --jobs 2.
for T in M-M S-L L-L S-S L-S; do
  out=/tmp/s19/fig11-s59/$T
  [ -f $out/compare.json ] && continue
  mkdir -p $out
  cd /tmp && PYTHONPATH=/tmp/s19/head/src nice -n 19 /work/main/.venv/bin/llumnix sim compare --scenario paper-fig11 \
    --traces $T --policies llumnix --seed 5 --seeds 5 --requests 10000 --jobs 2 --out $out 2> $out/run.log > $out/stdout.txt
  date -u +"%H:%M:%S $T done" >> /tmp/s19/fig11-s59/progress.txt
done
echo done >> /tmp/s19/fig11-s59/progress.txt
