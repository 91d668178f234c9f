#!/usr/bin/env bash
# Round 46, one GPU: round 45's comparison again after the norm's sums were grouped as the
# stacked state groups them and the carried kernels were handed to the model widened to
# float32 (so that gradients are summed across devices in float32): three interleaved pairs
# against the previous session's commit (base.tar: `git archive --prefix=base/ 4683d11`,
# untracked), then the new step's profile.
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
base_pairs 3 46
timeout 150 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/one --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -1
python3 benchmarks/trace_summary.py $OUT/one --top 30 --gaps 0
rm -rf $OUT/one/trace
