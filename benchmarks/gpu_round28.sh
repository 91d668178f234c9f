#!/usr/bin/env bash
# Round 28, one H200: where the bf16 step's time goes with the fused norm kernels (profile of
# three steps and the optimized HLO), for the next round of work.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BEST="model.scan_layers=false model.remat=operands_saveable"
timeout 150 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/one --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -3
python3 benchmarks/trace_summary.py $OUT/one --top 45
rm -rf $OUT/one/trace
