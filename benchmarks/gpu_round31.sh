#!/usr/bin/env bash
# Round 31, one GPU: against the previous commit (base.tar: `git archive --prefix=base/ ddff843`,
# untracked) on the same GPU, (1) the loss's logsumexp in one pass over the logits, (2) the
# blocks' kernels carried in compute dtype (precision.compute_copy) with GEMMs through the
# legacy cuBLAS API, the one XLA's dynamic-slice fusion takes (round 30: with cuBLASLt, each
# layer's kernel was copied out of the stacked copy first, 168 memcpys, 2.3 ms).
# precision.compute_copy was measured here and removed after round 31 (no gain without the
# dynamic-slice fusion, which XLA applies to legacy cuBLAS calls only): the key no longer exists.
source benchmarks/gpu_lib.sh
LEGACY="--xla_gpu_enable_cublaslt=false"
DSF="$LEGACY --xla_gpu_enable_dynamic_slice_fusion=true"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2 $BEST"
unpack_base
(cd /tmp/base/base && timeout 70 $BENCH --out $OUT/bench31_base.jsonl 2>&1 | row)
timeout 70 $BENCH precision.compute_copy=false --out $OUT/bench31.jsonl 2>&1 | row
timeout 70 $BENCH --out $OUT/bench31.jsonl 2>&1 | row
XLA_FLAGS=$LEGACY timeout 70 $BENCH precision.compute_copy=false --out $OUT/bench31.jsonl 2>&1 | row
XLA_FLAGS=$DSF timeout 70 $BENCH --out $OUT/bench31.jsonl 2>&1 | row
XLA_FLAGS=$DSF timeout 100 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/dsf 2>&1 \
  | grep -v "^W\|Warning" | tail -2
echo "dynamic-slice fusions: $(zcat $OUT/dsf/train_step.hlo.txt.gz | grep -c '^ *%address_computation[.0-9]* = ')"
(cd /tmp/base/base && timeout 60 $BENCH --out $OUT/bench31_base.jsonl 2>&1 | row)
timeout 60 $BENCH precision.compute_copy=false --out $OUT/bench31.jsonl 2>&1 | row
