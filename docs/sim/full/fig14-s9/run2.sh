#!/bin/bash
# Session 9 Fig. 14 Poisson 2.5 or Gamma CV 2 (argument: poisson25 | cv2), same settings as fig14.sh; two of these at once.
pt=$1
for s in 0 1 2 3 4; do for pol in infaas++ llumnix; do
  out=/tmp/s9/out/fig14/$pt/seed$s-$pol
  [ -f $out/summary.json ] && continue
  extra=""; [ $pol = infaas++ ] && extra="--no-migration"
  if [ $pt = poisson25 ]; then wl=L-L:poisson:rate=2.5:n=3000; else wl=L-L:gamma:rate=2.0:cv=2:n=3000; fi
  cd /tmp && PYTHONPATH=/tmp/s9/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 8 --workload $wl \
    --policy $pol $extra --autoscale --min 1 --max 16 --scale-up 10 --scale-down 60 --scaling-warmup-s 100 \
    --drain-victim last --split-steps --migrate-out-threshold 3 --seed $s --out $out > /tmp/s9/out/fig14-log-$pt-s$s-$pol.txt 2>&1
done; done
echo done > /tmp/s9/out/FIG14_$pt.DONE
