#!/usr/bin/env bash
# Round 27, nvidia-h200-x2: two-GPU scaling with the fused norm kernels (the default), against
# one GPU of the same machine measured before and after (round 25 had data=2 at 1.898x).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BEST="model.scan_layers=false model.remat=operands_saveable"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 $BEST --out $OUT/bench27.jsonl"
row() { grep -v "^W\|Warning" | grep "tokens_per_s\|Error\|error" | tail -2 | cut -c1-300; }
CUDA_VISIBLE_DEVICES=0 timeout 90 $BENCH 2>&1 | row
timeout 90 $BENCH mesh.data=2 train.batch_size=16 2>&1 | row
timeout 90 $BENCH mesh.data=1 mesh.fsdp=2 train.batch_size=16 2>&1 | row
CUDA_VISIBLE_DEVICES=0 timeout 70 $BENCH 2>&1 | row
