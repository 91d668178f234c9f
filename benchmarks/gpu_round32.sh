#!/usr/bin/env bash
# Round 32, one GPU: the committed code (logsumexp in one pass) against the previous session's
# (base.tar: `git archive --prefix=base/ ddff843`, untracked) on the same GPU; cuBLAS for every
# GEMM (XLA's Triton GEMMs off); fp8 delayed with the head in fp8 (the ratio to bf16); the scan
# (bench config's defaults: compile time).
source benchmarks/gpu_lib.sh
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2"
unpack_base
(cd /tmp/base/base && timeout 70 $BENCH $BEST --out $OUT/bench32_base.jsonl 2>&1 | row)
timeout 70 $BENCH $BEST --out $OUT/bench32.jsonl 2>&1 | row
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 70 $BENCH $BEST --out $OUT/bench32.jsonl 2>&1 | row
timeout 170 $BENCH $BEST precision.fp8=delayed precision.fp8_head=true --out $OUT/bench32.jsonl 2>&1 | row
timeout 50 $BENCH --out $OUT/bench32.jsonl 2>&1 | row
timeout 50 $BENCH $BEST --out $OUT/bench32.jsonl 2>&1 | row
(cd /tmp/base/base && timeout 50 $BENCH $BEST --out $OUT/bench32_base.jsonl 2>&1 | row)
