#!/usr/bin/env bash
# Round 37, one GPU: the fp8 step (delayed scaling, head in fp8) with its whole output: in
# rounds 32 and 36 its bench row printed nothing.
source benchmarks/gpu_lib.sh
timeout 220 python3 -m paxlite bench configs/bench-1.7b.yaml --steps 5 --warmup 2 $BEST precision.fp8=delayed \
  precision.fp8_head=true --out $OUT/bench37.jsonl 2>&1 | grep -v "^W" | tail -25
echo "exit ${PIPESTATUS[0]}"
