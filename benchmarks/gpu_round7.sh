#!/usr/bin/env bash
# Round 7, one H200: stacked-kernel GEMMs (benchmarks/projection_fusion.py) and where the fp8
# delayed step's time goes (profile), to see what separates it from 1.3x bf16.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 benchmarks/projection_fusion.py 2>&1 | grep -v "^W\|Warning"
timeout 300 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml model.remat=dots_attention_saveable \
  precision.fp8=delayed --out $OUT/fp8 --trace 2>&1 | grep -v "^W\|Warning" | tail -5
python3 benchmarks/trace_summary.py $OUT/fp8 --top 40
cp $(find $OUT/fp8 -name "*.trace.json.gz") $OUT/fp8/ 2>/dev/null; rm -rf $OUT/fp8/trace
