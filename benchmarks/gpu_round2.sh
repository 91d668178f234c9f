#!/usr/bin/env bash
# Round 2 on one H200: cuDNN attention by default; remat and XLA-flag variants; a profile.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench.jsonl"
python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml --out $OUT --trace 2>&1 | grep -v "^W\|Warning" | tail -6
$B --runs "" "model.remat=dots_saveable" "model.remat=full" 2>&1 | tail -5
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" $B 2>&1 | tail -1
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer=" $B 2>&1 | tail -1
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" $B 2>&1 | tail -1
(cd $OUT && [ -d trace ] && tar czf trace.tgz trace && rm -rf trace)
ls -la $OUT
