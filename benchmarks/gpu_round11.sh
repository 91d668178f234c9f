#!/usr/bin/env bash
# Round 11, one H200: fp8 with Triton GEMM autotuning off (compile 83 s -> 8 s in round 10),
# scan and unrolled, against bf16 unrolled on the same GPU; then fp8 with the defaults.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench11.jsonl model.remat=dots_attention_saveable"
NT=--xla_gpu_enable_triton_gemm=false
XLA_FLAGS=$NT timeout 70 $B precision.fp8=delayed model.scan_layers=false 2>&1 | tail -1
timeout 60 $B model.scan_layers=false 2>&1 | tail -1
XLA_FLAGS=$NT timeout 50 $B precision.fp8=delayed 2>&1 | tail -1
timeout 110 $B precision.fp8=delayed 2>&1 | tail -1
