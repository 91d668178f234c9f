#!/usr/bin/env bash
# Round 44, one GPU: this session's final code alone, three runs of 20 timed steps, to put a
# figure against the H200 goal (52,500 tokens/s) should the call land on an H200.
source benchmarks/gpu_lib.sh
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
for run in 1 2 3; do
  timeout 90 $BENCH --out $OUT/bench44.jsonl 2>&1 | row 120
done
