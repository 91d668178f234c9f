#!/usr/bin/env bash
# Round 39, one GPU: the loss's Pallas kernel (paxlite/loss_kernels.py) alone, its block sizes
# swept against XLA's two passes (benchmarks/reductions.py --sweep), then the step with it
# against the previous session's commit (base.tar: `git archive --prefix=base/ c7de156`,
# untracked: XLA's one-pass logsumexp) on the same GPU, interleaved.
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2 $BEST"
timeout 150 python3 benchmarks/reductions.py --sweep 2>&1 | grep -v "^W\|Warning" | tail -24
unpack_base
(cd /tmp/base/base && timeout 70 $BENCH --out $OUT/bench39_base.jsonl 2>&1 | row)
timeout 70 $BENCH --out $OUT/bench39.jsonl 2>&1 | row
(cd /tmp/base/base && timeout 60 $BENCH --out $OUT/bench39_base.jsonl 2>&1 | row)
timeout 60 $BENCH --out $OUT/bench39.jsonl 2>&1 | row
timeout 150 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/one --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -1
python3 benchmarks/trace_summary.py $OUT/one --top 60 --gaps 0
rm -rf $OUT/one/trace
