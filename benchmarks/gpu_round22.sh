#!/usr/bin/env bash
# Round 22, one H200: can XLA's newer fusion passes fuse the RMSNorms' row reduction with
# their elementwise work (one pass over the activations instead of two or three)? The bf16
# bench with XLA's block-level fusion rewriter and its Triton "heroless" priority fusion, each
# alone and together, against the defaults on the same GPU; the optimized HLO of each for the
# norms' fusions.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BEST="model.scan_layers=false model.remat=operands_saveable"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 $BEST --out $OUT/bench22.jsonl"
BLOCK=--xla_gpu_experimental_enable_fusion_block_level_rewriter=true
HEROLESS=--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true
run() {  # label, XLA flags
  echo "== $1"
  XLA_FLAGS="$2" timeout 110 $BENCH 2>&1 | grep -v "^W\|Warning" | tail -1
  XLA_FLAGS="$2" timeout 80 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/$1 2>&1 \
    | grep -v "^W\|Warning" | tail -1
}
run base ""
run block "$BLOCK"
run heroless "$HEROLESS"
run both "$BLOCK $HEROLESS"
timeout 90 $BENCH 2>&1 | tail -1  # the defaults again: the GPU's drift over the round
