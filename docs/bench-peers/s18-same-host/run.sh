#!/bin/bash
# Session 18: trees alternated on one host, the issue's workload (200 M-M requests, Poisson 4 req/s, lengths capped at
# 1,024), llumnix only, one repeat per invocation. Each tree from `git archive --prefix=pyllumnix/ <rev>` into
# /tmp/s18/snap<T>, on PYTHONPATH:
#   I = 4260a3f (the tree #20 was filed against), H = 14a2883 (session start), P = H with the sim's KV fills turned
#   off (an experiment: `PayloadStore.fill` returns at once), L = 429bc76 (payload records), R = 19b44f5 (+ leases
#   renewed every 2 s), S = 7a04048 (+ one loop turn less per step).
# Rounds: TREES="P H" N=2, TREES="L I H" FROM=3 N=4, TREES="R L I" FROM=5 N=6, TREES="S R I" FROM=7 N=8.
SNAPS=/tmp/s18 OUT=/tmp/s18/ab TREES="${TREES:-P H}" N="${N:-2}" exec "$(dirname "$0")/../alternate.sh"
