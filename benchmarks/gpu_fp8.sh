#!/usr/bin/env bash
# fp8 on one H200: the GPU test (every decoder GEMM an fp8 cuBLASLt/Triton GEMM), then bf16
# against fp8 current/delayed on the benchmark model, with the GEMM counts of each compiled step.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda python3 -m pytest -q -s tests/test_precision.py -k gpu 2>&1 | grep -v "^W\|Warning" | tail -4
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench.jsonl"
CUDA_VISIBLE_DEVICES=0 $B model.remat=dots_attention_saveable \
  --runs "precision.fp8=none" "precision.fp8=current" "precision.fp8=delayed" 2>&1 | tail -4
CUDA_VISIBLE_DEVICES=0 $B model.remat=none \
  --runs "precision.fp8=none" "precision.fp8=delayed" 2>&1 | tail -3
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml model.remat=dots_attention_saveable \
  precision.fp8=delayed --out $OUT 2>&1 | grep -v "^W\|Warning" | tail -5
