#!/usr/bin/env bash
# Round 23, one H200: the fused residual-add + RMSNorm Pallas kernels (model.norm_kernel)
# alone against XLA's fusions at the 1.7B activation shape, then the bf16 train step with
# model.norm_kernel=xla against pallas on the same GPU (each twice, alternating, for drift).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 benchmarks/norm_kernels.py 2>&1 | grep -v "^W\|Warning"
BEST="model.scan_layers=false model.remat=operands_saveable"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 $BEST --out $OUT/bench${ROUND:-23}.jsonl"
for kernel in xla pallas xla pallas; do
  timeout 100 $BENCH model.norm_kernel=$kernel 2>&1 | grep -v "^W\|Warning" | grep "norm_kernel\|Error\|error" | tail -3
done
