#!/usr/bin/env bash
# Round 48, one GPU, a third H100: the layered state with carried bf16 kernels against the same
# code with precision.compute_copy=false (the stacked state, as before it), three interleaved
# pairs of 20 timed steps.
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
for pair in 1 2 3; do
  timeout 75 $BENCH precision.compute_copy=false --out $OUT/bench48_off.jsonl 2>&1 | row 120
  timeout 75 $BENCH --out $OUT/bench48.jsonl 2>&1 | row 120
done
