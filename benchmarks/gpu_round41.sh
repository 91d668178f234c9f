#!/usr/bin/env bash
# Round 41, one GPU: round 40's comparison again with twice the steps and four interleaved pairs
# (the loss's Pallas kernel against the previous session's commit, base.tar: `git archive
# --prefix=base/ c7de156`, untracked), to resolve the ~0.1% its kernel time predicts. Round 43
# runs it again on another machine (ROUND=43: its own output files).
source benchmarks/gpu_lib.sh
ROUND=${ROUND:-41}
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
base_pairs 4 ${ROUND}
