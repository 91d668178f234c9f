#!/usr/bin/env bash
# Round 15, nvidia-h200-x2: the final code (one split per stacked array, kernels cast to bf16
# before the layers run) on one GPU and on two, same machine; then fp8 on one GPU.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench15.jsonl"
BEST="model.scan_layers=false model.remat=operands_saveable"
CUDA_VISIBLE_DEVICES=0 timeout 130 $B --runs "$BEST" "model.remat=dots_attention_saveable" 2>&1 | tail -4
timeout 190 $B --runs "$BEST mesh.data=2 train.batch_size=16" "$BEST mesh.data=1 mesh.fsdp=2 train.batch_size=16" 2>&1 | tail -4
CUDA_VISIBLE_DEVICES=0 timeout 215 $B $BEST precision.fp8=delayed 2>&1 | tail -3
