#!/usr/bin/env bash
# Round 13, one H200: where the fp8 step's time goes now (operands_saveable, unrolled; Triton
# GEMMs off for an 8x faster compile), what `offload` saves at a batch where activations matter
# (32 sequences, against full remat), and fp8 unrolled with the default autotuning.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench13.jsonl"
FP8="precision.fp8=delayed model.remat=operands_saveable model.scan_layers=false"
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 130 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml \
  $FP8 --out $OUT/fp8 --trace 2>&1 | grep -v "^W\|Warning" | tail -3
python3 benchmarks/trace_summary.py $OUT/fp8 --top 30
rm -rf $OUT/fp8/trace
timeout 110 $B --runs "model.remat=full train.batch_size=32" "model.remat=offload train.batch_size=32" 2>&1 | tail -4
timeout 290 $B $FP8 2>&1 | tail -3
