#!/bin/bash
# Fig. 14 Gamma points on the session-7 profile, from a git archive snapshot (commit in /tmp/f14/COMMIT)
cd /tmp/f14
for cv in 4 6; do for s in 0 1 2 3 4; do for pol in infaas++ llumnix; do
  out=/tmp/f14/out/cv$cv/seed$s-$pol
  [ -f $out/summary.json ] && continue
  extra=""; [ $pol = infaas++ ] && extra="--no-migration"
  PYTHONPATH=/tmp/f14/src nice -n 19 /work/main/.venv/bin/llumnix sim --instances 8 --workload L-L:gamma:rate=2.0:cv=$cv:n=3000 \
    --policy $pol $extra --autoscale --min 1 --max 16 --scale-up 10 --scale-down 60 --scaling-warmup-s 100 \
    --drain-victim last --split-steps --migrate-out-threshold 3 --seed $s --out $out > /tmp/f14/log-cv$cv-s$s-$pol.txt 2>&1
done; done; done
echo done > /tmp/f14/DONE
