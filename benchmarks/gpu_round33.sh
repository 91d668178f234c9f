#!/usr/bin/env bash
# Round 33, one GPU: profile of the bf16 step with the loss's logsumexp in one pass (round 30's
# profile, before it: the max and the sum over the logits took 0.55 + 0.69 ms on an H100).
source benchmarks/gpu_lib.sh
timeout 200 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/one --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -3
python3 benchmarks/trace_summary.py $OUT/one --top 60
zcat $OUT/one/train_step.hlo.txt.gz | grep "^  %input_reduce_fusion" | cut -c1-140 | grep -v "f32\[24576\]\|f32\[2048\]\|f32\[6144\]"
rm -rf $OUT/one/trace
