#!/usr/bin/env bash
# Round 16, nvidia-h200-x2: fsdp=2 with unrolled layers under dots_attention_saveable on the final
# code, against one GPU of the same machine (round 15's fsdp=2 ran operands_saveable: 1.844x).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench16.jsonl model.scan_layers=false"
CUDA_VISIBLE_DEVICES=0 timeout 70 $B model.remat=dots_attention_saveable 2>&1 | tail -1
timeout 150 $B --runs "model.remat=dots_attention_saveable mesh.data=1 mesh.fsdp=2 train.batch_size=16" \
  "model.remat=operands_saveable mesh.data=1 mesh.fsdp=2 train.batch_size=16" 2>&1 | tail -2
