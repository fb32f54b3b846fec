#!/bin/bash
# Session 9 Fig. 14 Gamma CV 4 and CV 6 on the adopted profile (snapshot of 54ff083 = 098618c's code), after Fig. 13,
# the session-8 settings (docs/sim/reduced/fig14-s8/run.sh), nice -n 19, one at a time.
while [ ! -f /tmp/s9/out/FIG13_DONE ]; do sleep 10; done
for cv in 4 6; do for s in 0 1 2 3 4; do for pol in infaas++ llumnix; do
  out=/tmp/s9/out/fig14/cv$cv/seed$s-$pol
  [ -f $out/summary.json ] && continue
  extra=""; [ $pol = infaas++ ] && extra="--no-migration"
  cd /tmp && PYTHONPATH=/tmp/s9/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 8 --workload L-L:gamma:rate=2.0:cv=$cv:n=3000 \
    --policy $pol $extra --autoscale --min 1 --max 16 --scale-up 10 --scale-down 60 --scaling-warmup-s 100 \
    --drain-victim last --split-steps --migrate-out-threshold 3 --seed $s --out $out > /tmp/s9/out/fig14-log-cv$cv-s$s-$pol.txt 2>&1
done; done; done
echo done > /tmp/s9/out/FIG14_DONE
