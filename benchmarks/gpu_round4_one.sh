#!/usr/bin/env bash
# Round 4a, one H200 (of an x2 machine): fp8 GPU test, bf16 vs fp8 current/delayed with the
# fixed attention-saving remat policy, GEMM counts, and decoding speed.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -s tests/test_precision.py -k gpu 2>&1 | grep -v "^W\|Warning" | tail -3
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench.jsonl"
$B model.remat=dots_attention_saveable --runs "precision.fp8=none" "precision.fp8=current" "precision.fp8=delayed" 2>&1 | tail -4
$B model.remat=none precision.fp8=delayed 2>&1 | tail -1
timeout 120 python3 benchmarks/decode.py configs/bench-1.7b.yaml --batch 1 8 32 2>&1 | grep "^{" | tee $OUT/decode.jsonl
