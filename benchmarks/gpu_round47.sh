#!/usr/bin/env bash
# Round 47, one GPU: fp8 (delayed scaling, the head in fp8 too) with the layered train state
# and its carried bf16 kernels (precision.compute_copy, on by default; fp8 quantises those
# kernels), beside the bf16 step on the same GPU. (Two GPUs were asked for, to measure data=2
# and fsdp=2 with it, and were not lent.)
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 3 $BEST --out $OUT/bench47.jsonl"
timeout 80 $BENCH 2>&1 | row 160
timeout 300 $BENCH precision.fp8=delayed precision.fp8_head=true 2>&1 | row 160
timeout 60 $BENCH 2>&1 | row 160
