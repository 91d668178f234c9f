#!/usr/bin/env bash
# Rounds 52-53, one H200 (session 12): this code's bf16 step, 30 timed steps, under XLA GPU
# flags not swept before, each beside runs with none (XLA_FLAGS empty; paxlite's own defaults
# are added either way). Session 12 sent the two loops as two calls on one warm machine.
source benchmarks/gpu_lib.sh
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 30 --warmup 3 $BEST"
sweep() {
  for f in "$@"; do
    echo "flags: [$f]"
    XLA_FLAGS="$f" timeout 110 $B --out "$OUT/bench${ROUND}.jsonl" 2>&1 | row 200
  done
}
ROUND=52 sweep "" "--xla_gpu_enable_command_buffer=" "" \
  "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
ROUND=53 sweep "--xla_gpu_triton_gemm_any=true" "--xla_gpu_cudnn_gemm_fusion_level=2" "" \
  "--xla_gpu_exhaustive_tiling_search=true" "--xla_gpu_enable_cublaslt=true"
