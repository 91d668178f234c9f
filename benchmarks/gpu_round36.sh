#!/usr/bin/env bash
# Round 36, one GPU: this session's final code (logsumexp in one pass, gradient norm summed by
# layer) against the previous session's commit (base.tar: `git archive --prefix=base/
# ddff843`, untracked), interleaved on the same GPU; then fp8 delayed with the head in fp8
# (its ratio to bf16 on this GPU).
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2 $BEST"
unpack_base
(cd /tmp/base/base && timeout 70 $BENCH --out $OUT/bench36_base.jsonl 2>&1 | row)
timeout 70 $BENCH --out $OUT/bench36.jsonl 2>&1 | row
(cd /tmp/base/base && timeout 50 $BENCH --out $OUT/bench36_base.jsonl 2>&1 | row)
timeout 50 $BENCH --out $OUT/bench36.jsonl 2>&1 | row
timeout 230 $BENCH precision.fp8=delayed precision.fp8_head=true --out $OUT/bench36.jsonl 2>&1 | row
