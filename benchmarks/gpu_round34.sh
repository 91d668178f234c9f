#!/usr/bin/env bash
# Round 34, one GPU: the two reductions alone (benchmarks/reductions.py), then the step with
# (1) the loss's logsumexp in one pass (now taken on one GPU: round 31-32's code took XLA's
# two passes, reading the size-1 tensor axis as a split vocabulary) and (2) the gradient norm
# summed layer by layer, against the previous session's commit (base.tar: `git archive
# --prefix=base/ ddff843`, untracked) on the same GPU, and a profile of the new step.
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2 $BEST"
timeout 60 python3 benchmarks/reductions.py 2>&1 | grep -v "^W\|Warning" | tail -7
unpack_base
(cd /tmp/base/base && timeout 70 $BENCH --out $OUT/bench34_base.jsonl 2>&1 | row)
timeout 70 $BENCH --out $OUT/bench34.jsonl 2>&1 | row
(cd /tmp/base/base && timeout 50 $BENCH --out $OUT/bench34_base.jsonl 2>&1 | row)
timeout 50 $BENCH --out $OUT/bench34.jsonl 2>&1 | row
timeout 150 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/one --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -2
python3 benchmarks/trace_summary.py $OUT/one --top 40
rm -rf $OUT/one/trace
