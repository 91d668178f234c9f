#!/usr/bin/env bash
# Round 18, one H200: (1) does an XLA flag change which GEMM kernels the model's shapes get
# (benchmarks/gemm_shapes.py, also through PyTorch when the image has it); (2) bf16 and fp8 on
# the same GPU with the round-17 code, and where the fp8 step's time goes now.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for flags in "" "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_autotune_level=0" "--xla_gpu_enable_cublaslt=false"; do
  XLA_FLAGS="$flags" timeout 60 python3 benchmarks/gemm_shapes.py --label="${flags:-default flags}" 2>&1 | grep TFLOP
done
timeout 60 python3 benchmarks/gemm_shapes.py --dtype fp8 2>&1 | grep TFLOP
python3 -c "import torch" 2>/dev/null && timeout 60 python3 benchmarks/gemm_shapes.py --torch 2>&1 | grep TFLOP
BEST="model.scan_layers=false model.remat=operands_saveable"
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench18.jsonl $BEST"
timeout 100 $B 2>&1 | tail -2
timeout 240 $B precision.fp8=delayed 2>&1 | tail -2
timeout 100 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST precision.fp8=delayed --out $OUT/fp8 --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -3
python3 benchmarks/trace_summary.py $OUT/fp8 --top 60
rm -rf $OUT/fp8/trace
