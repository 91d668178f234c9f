#!/usr/bin/env bash
# Round 5, one H200: the fp8 GPU test (GEMM counts), fp8 GEMM count of the 1.7B step, and the
# planner's memory / step-time prediction against a measured run.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -s tests/test_precision.py -k gpu 2>&1 | grep -v "^W\|Warning" | tail -4
timeout 200 python3 -m paxlite bench configs/bench-1.7b.yaml --steps 5 --warmup 2 model.remat=dots_attention_saveable precision.fp8=delayed --out $OUT/bench.jsonl 2>&1 | tail -2
timeout 200 python3 benchmarks/plan_vs_measured.py configs/bench-1.7b.yaml --devices 1 --runs "mesh.data=1 model.remat=dots_attention_saveable" 2>&1 | grep -v "^W\|Warning" | tail -6
