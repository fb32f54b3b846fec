#!/bin/bash
# Session 16: trees alternated on one host, the issue's workload (200 M-M requests, Poisson 4 req/s, lengths capped at
# 1,024), llumnix only, one repeat per invocation. Each tree from `git archive --prefix=pyllumnix/ <rev>` into
# /tmp/s16/snap<T>, on PYTHONPATH:
#   I = 4260a3f (the tree #20 was filed against), C = 1b1b301 (session start), N = ae3f4de (this session's two changes),
#   R = C with the llumlets' --load-interval-ms default 100 instead of 50 (exploratory: what the load reports cost).
# Rounds: TREES="I C" N=3 (I1 C1 .. I3 C3), TREES="R C" FROM=4 N=5, TREES="N C I" FROM=6 N=7.
SNAPS=/tmp/s16 OUT=/tmp/s16/ic TREES="${TREES:-I C}" N="${N:-3}" exec "$(dirname "$0")/../alternate.sh"
