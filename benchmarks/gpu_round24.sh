#!/usr/bin/env bash
# Round 24, one H200: round 23 again with the kernels' block sizes that round 23 measured
# fastest (4 rows per step, 64 per backward program), and more block sizes swept.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 benchmarks/norm_kernels.py 2>&1 | grep -v "^W\|Warning"
BEST="model.scan_layers=false model.remat=operands_saveable"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 $BEST --out $OUT/bench24.jsonl"
for kernel in xla pallas xla pallas; do
  timeout 100 $BENCH model.norm_kernel=$kernel 2>&1 | grep -v "^W\|Warning" | grep "norm_kernel\|Error\|error" | tail -3
done
