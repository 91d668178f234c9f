#!/usr/bin/env bash
# Round 14, one H200: unrolled layers now split each stacked parameter once (its gradient is one
# concatenation, no longer a sum of 24 zero-padded arrays: ~15 ms of round 13's fp8 profile).
# bf16 and fp8 on the same GPU, then where the bf16 step's time goes.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench14.jsonl model.scan_layers=false"
timeout 130 $B --runs "model.remat=dots_attention_saveable" "model.remat=operands_saveable" 2>&1 | tail -4
timeout 260 $B precision.fp8=delayed model.remat=operands_saveable 2>&1 | tail -3
timeout 120 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml model.scan_layers=false \
  model.remat=operands_saveable --out $OUT/bf16 --trace 2>&1 | grep -v "^W\|Warning" | tail -2
python3 benchmarks/trace_summary.py $OUT/bf16 --top 25
rm -rf $OUT/bf16/trace
