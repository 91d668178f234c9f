#!/usr/bin/env bash
# Round 8, on nvidia-h200-x4 (one and two of its GPUs): unrolled layers against the scan for
# bf16 and fp8 (fp8 delayed now quantises a shared input once), and whether unrolled layers let
# the data / fsdp gradient collectives overlap the backward pass on two GPUs.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench8.jsonl model.remat=dots_attention_saveable"
U=model.scan_layers=false
export CUDA_VISIBLE_DEVICES=0
timeout 100 $B --runs "" "$U" 2>&1 | tail -2
timeout 150 $B precision.fp8=delayed 2>&1 | tail -1
export CUDA_VISIBLE_DEVICES=0,1
timeout 230 $B --runs "mesh.data=2 train.batch_size=16 $U" "mesh.data=1 mesh.fsdp=2 train.batch_size=16 $U" \
  "mesh.data=2 train.batch_size=16" 2>&1 | tail -3
export CUDA_VISIBLE_DEVICES=0
timeout 120 $B precision.fp8=delayed $U 2>&1 | tail -1
