#!/bin/bash
# Session 17: trees alternated on one host, the issue's workload (200 M-M requests, Poisson 4 req/s, lengths capped at
# 1,024), llumnix only, one repeat per invocation. Each tree from `git archive --prefix=pyllumnix/ <rev>` into
# /tmp/s17/snap<T>, on PYTHONPATH:
#   B = 4a6c4b4 (session start), F = c663aef (framed Dispatch), G = 3b5f2ca (+ framed AddRequest),
#   H = 7fe5ccf (G after review), I = 4260a3f (the tree #20 was filed against).
# Rounds: TREES="F B" N=2 (F1 B1 F2 B2), TREES="G B" FROM=3 N=4, TREES="H B I" FROM=5 N=7.
SNAPS=/tmp/s17 OUT=/tmp/s17/ab TREES="${TREES:-F B}" N="${N:-2}" exec "$(dirname "$0")/../alternate.sh"
