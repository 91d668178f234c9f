#!/usr/bin/env bash
# Round 38, one GPU: where the bf16 step's idle time sits (benchmarks/trace_summary.py now
# lists the gaps between kernels by length), and whether XLA's command buffers (CUDA graphs),
# which remove launch gaps, change the step: off, and on for more kinds of thunks.
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2 $BEST"
timeout 150 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/one --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -2
python3 benchmarks/trace_summary.py $OUT/one --top 12 --gaps 12
rm -rf $OUT/one/trace
timeout 70 $BENCH --out $OUT/bench38.jsonl 2>&1 | row
XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout 70 $BENCH --out $OUT/bench38.jsonl 2>&1 | row
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION --xla_gpu_graph_min_graph_size=2" \
  timeout 70 $BENCH --out $OUT/bench38.jsonl 2>&1 | row
timeout 70 $BENCH --out $OUT/bench38.jsonl 2>&1 | row
