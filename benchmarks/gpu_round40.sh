#!/usr/bin/env bash
# Round 40, one GPU: the step with the loss's Pallas kernel reading the head's bf16 logits
# (round 39's read a float32 copy that XLA wrote for it: -0.6%), against the previous
# session's commit (base.tar: `git archive --prefix=base/ c7de156`, untracked), interleaved.
# Every run loads the GEMM autotuning results of the first: round 39's profile had XLA pick
# Triton for 96 GEMMs where round 38's cuBLAS took all, which alone moves the step by tenths
# of a percent; with the same picks the two codes differ only in what they change.
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2 $BEST"
TUNED="--xla_gpu_load_autotune_results_from=$OUT/autotune.textproto"
unpack_base
(cd /tmp/base/base && XLA_FLAGS="--xla_gpu_dump_autotune_results_to=$OUT/autotune.textproto" \
  timeout 80 $BENCH --out $OUT/bench40_base.jsonl 2>&1 | row)
XLA_FLAGS=$TUNED timeout 70 $BENCH --out $OUT/bench40.jsonl 2>&1 | row
(cd /tmp/base/base && XLA_FLAGS=$TUNED timeout 60 $BENCH --out $OUT/bench40_base.jsonl 2>&1 | row)
XLA_FLAGS=$TUNED timeout 60 $BENCH --out $OUT/bench40.jsonl 2>&1 | row
(cd /tmp/base/base && XLA_FLAGS=$TUNED timeout 60 $BENCH --out $OUT/bench40_base.jsonl 2>&1 | row)
XLA_FLAGS=$TUNED timeout 60 $BENCH --out $OUT/bench40.jsonl 2>&1 | row
XLA_FLAGS=$TUNED timeout 150 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/one --trace 2>&1 \
  | grep -v "^W\|Warning" | grep "triton_gemm\|trace"
python3 benchmarks/trace_summary.py $OUT/one --top 40 --gaps 0
rm -rf $OUT/one/trace
