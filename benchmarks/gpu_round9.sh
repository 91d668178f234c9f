#!/usr/bin/env bash
# Round 9, nvidia-h200-x4: the issue-10 table on 4 GPUs (benchmarks/scaleout.py), then data=4
# and fsdp=4 with unrolled layers (gradient collectives free to overlap the backward pass).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 benchmarks/scaleout.py measure --devices 4 --budget-s 400 --out $OUT 2>&1 | grep -v "^W\|Warning" | tail -14
timeout 150 python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench9.jsonl \
  model.remat=dots_attention_saveable model.scan_layers=false \
  --runs "mesh.data=4 train.batch_size=32" "mesh.data=1 mesh.fsdp=4 train.batch_size=32" 2>&1 | tail -2
