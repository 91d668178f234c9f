#!/usr/bin/env bash
# Round 42, one GPU: (1) what storing the unrolled blocks' parameters layer by layer would save
# (benchmarks/optimizer_layout.py: the optimizer's update plus the bf16 cast the next step's
# GEMMs read, stacked against per layer); (2) the fp8 step (delayed, fp8 head) with the loss's
# Pallas kernel, which reads the head's bf16 logits there too.
source benchmarks/gpu_lib.sh
timeout 150 python3 benchmarks/optimizer_layout.py 2>&1 | grep -v "^W\|Warning" | tail -6
timeout 300 python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2 $BEST \
  precision.fp8=delayed precision.fp8_head=true --out $OUT/bench42_fp8.jsonl 2>&1 | row
