#!/usr/bin/env bash
# Round 43, one GPU: round 41 again on another machine (four interleaved pairs of 20 timed
# steps: the loss's Pallas kernel against the previous session's commit, base.tar: `git
# archive --prefix=base/ c7de156`, untracked), to firm up rounds 40-41's +0.15%.
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
unpack_base
for pair in 1 2 3 4; do
  (cd /tmp/base/base && timeout 75 $BENCH --out $OUT/bench43_base.jsonl 2>&1 | row 120)
  timeout 75 $BENCH --out $OUT/bench43.jsonl 2>&1 | row 120
done
