#!/usr/bin/env bash
# Round 26, one H200: the committed code with the fused norm kernels on by default: bf16, fp8
# delayed and fp8 delayed with the head in fp8 on the same GPU (fp8's ratio to bf16), and
# full remat with the scan (blocks hand on one array under policies that keep only inputs).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BEST="model.scan_layers=false model.remat=operands_saveable"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench26.jsonl"
row() { grep -v "^W\|Warning" | grep "tokens_per_s\|Error\|error" | tail -2 | cut -c1-330; }
timeout 90 $BENCH $BEST 2>&1 | row
timeout 60 $BENCH model.remat=full 2>&1 | row
timeout 170 $BENCH $BEST precision.fp8=delayed 2>&1 | row
timeout 150 $BENCH $BEST precision.fp8=delayed precision.fp8_head=true 2>&1 | row
timeout 70 $BENCH $BEST 2>&1 | row  # bf16 again: the GPU's drift over the round
