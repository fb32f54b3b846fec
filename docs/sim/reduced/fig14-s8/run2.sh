#!/bin/bash
# Fig. 14 Poisson 2.5 and Gamma CV 2 points, same settings (after run.sh)
while [ ! -f /tmp/f14/DONE ]; do sleep 10; done
cd /tmp/f14
for pt in poisson25 cv2; do for s in 0 1 2 3 4; do for pol in infaas++ llumnix; do
  out=/tmp/f14/out/$pt/seed$s-$pol
  [ -f $out/summary.json ] && continue
  extra=""; [ $pol = infaas++ ] && extra="--no-migration"
  if [ $pt = poisson25 ]; then wl=L-L:poisson:rate=2.5:n=3000; else wl=L-L:gamma:rate=2.0:cv=2:n=3000; fi
  PYTHONPATH=/tmp/f14/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 8 --workload $wl \
    --policy $pol $extra --autoscale --min 1 --max 16 --scale-up 10 --scale-down 60 --scaling-warmup-s 100 \
    --drain-victim last --split-steps --migrate-out-threshold 3 --seed $s --out $out > /tmp/f14/log-$pt-s$s-$pol.txt 2>&1
done; done; done
echo done > /tmp/f14/DONE2
