#!/usr/bin/env bash
# Round 6, one H200: the scan's per-layer copies. The profile of round 3 shows 11 ms/step of
# memcpy (each saved GEMM output copied into the scan's stacked residual buffer) and ~7 ms of
# zero-filling those buffers. Tries XLA's dynamic-slice fusion (GEMMs write into the stacked
# buffer in place) and unrolled layers (no stacked residuals at all), bf16 then fp8, and
# profiles the best bf16 candidate.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
DSF="--xla_gpu_enable_dynamic_slice_fusion=true"
B="timeout 170 python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench6.jsonl model.remat=dots_attention_saveable"
$B --runs "model.scan_layers=false" "" 2>&1 | tail -3
XLA_FLAGS="$DSF" $B 2>&1 | tail -1
$B precision.fp8=delayed model.scan_layers=false 2>&1 | tail -1
timeout 120 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml model.remat=dots_attention_saveable \
  model.scan_layers=false --out $OUT/unrolled --trace 2>&1 | grep -v "^W\|Warning" | tail -5
python3 benchmarks/trace_summary.py $OUT/unrolled --top 30
find $OUT/unrolled -name "*.xplane.pb" -delete
