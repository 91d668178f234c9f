#!/usr/bin/env bash
# Round 45, one GPU: the unrolled blocks' parameters and moments carried layer by layer, with
# their kernels in bf16 written by the optimizer's pass (precision.compute_copy, paxlite/
# step_state.py), against the previous session's commit (base.tar: `git archive --prefix=base/
# 4683d11`, untracked) on the same GPU, interleaved; then the new step's profile, to see the
# cast-and-split pass gone and no copies in its place.
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
base_pairs 2 45
timeout 75 $BENCH precision.compute_copy=false --out $OUT/bench45_off.jsonl 2>&1 | row 120
timeout 150 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/one --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -1
python3 benchmarks/trace_summary.py $OUT/one --top 40 --gaps 0
rm -rf $OUT/one/trace
