#!/usr/bin/env bash
# Round 19, nvidia-h200-x2: the final code on one machine. One GPU: bf16, fp8 delayed, fp8
# delayed with the output head in fp8 too (precision.fp8_head); two GPUs: data=2 and fsdp=2
# (fsdp's buckets now 128 MiB by default, paxlite/xla_flags.py).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BEST="model.scan_layers=false model.remat=operands_saveable"
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench19.jsonl $BEST"
export CUDA_VISIBLE_DEVICES=0
timeout 100 $B 2>&1 | tail -1
timeout 230 $B precision.fp8=delayed 2>&1 | tail -1
timeout 150 $B precision.fp8=delayed precision.fp8_head=true 2>&1 | tail -1
unset CUDA_VISIBLE_DEVICES
timeout 100 $B mesh.data=2 train.batch_size=16 2>&1 | tail -1
timeout 100 $B mesh.data=1 mesh.fsdp=2 train.batch_size=16 2>&1 | tail -1
