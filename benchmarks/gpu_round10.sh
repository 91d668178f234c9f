#!/usr/bin/env bash
# Round 10, nvidia-h200-x2: can XLA's scheduling flags hide the data=2 gradient all-reduce
# behind the (unrolled) backward pass, and where the fp8 step's compile time goes (Triton GEMM
# autotuning off, autotuning off).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench10.jsonl model.remat=dots_attention_saveable"
U=model.scan_layers=false
LHS=--xla_gpu_enable_latency_hiding_scheduler=true
CUDA_VISIBLE_DEVICES=0 timeout 60 $B $U 2>&1 | tail -1
timeout 60 $B $U mesh.data=2 train.batch_size=16 2>&1 | tail -1
XLA_FLAGS="$LHS" timeout 60 $B $U mesh.data=2 train.batch_size=16 2>&1 | tail -1
XLA_FLAGS="$LHS --xla_gpu_all_reduce_combine_threshold_bytes=134217728" timeout 60 $B $U mesh.data=2 train.batch_size=16 2>&1 | tail -1
export CUDA_VISIBLE_DEVICES=0
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" timeout 110 $B precision.fp8=delayed 2>&1 | tail -1
XLA_FLAGS="--xla_gpu_autotune_level=0" timeout 110 $B precision.fp8=delayed 2>&1 | tail -1
