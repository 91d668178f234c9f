#!/usr/bin/env bash
# Round 17, nvidia-h200-x2: the cross-entropy's hand-written gradient and the norms' residuals
# kept by operands_saveable, against the previous commit (base.tar: `git archive --prefix=base/
# 22ec47b`) on the same GPU; fsdp=2 with larger all-gather / reduce-scatter buckets; where the
# one-GPU and the fsdp=2 steps' time goes (HLO and trace summaries).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BEST="model.scan_layers=false model.remat=operands_saveable"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10"
B="$BENCH --out $OUT/bench17.jsonl"
mkdir -p /tmp/base && tar -xf base.tar -C /tmp/base
(cd /tmp/base/base && CUDA_VISIBLE_DEVICES=0 timeout 100 $BENCH --out $OUT/bench17_base.jsonl $BEST 2>&1 | tail -2)
CUDA_VISIBLE_DEVICES=0 timeout 100 $B $BEST 2>&1 | tail -2
FS="$BEST mesh.data=1 mesh.fsdp=2 train.batch_size=16"
timeout 100 $B $FS 2>&1 | tail -2
XLA_FLAGS="--xla_gpu_all_gather_combine_threshold_bytes=134217728 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728" \
  timeout 100 $B $FS 2>&1 | tail -2
for run in one fsdp; do
  if [ $run = one ]; then args="$BEST"; export CUDA_VISIBLE_DEVICES=0; else args="$FS"; unset CUDA_VISIBLE_DEVICES; fi
  timeout 100 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $args --out $OUT/$run --trace 2>&1 \
    | grep -v "^W\|Warning" | tail -3
  python3 benchmarks/trace_summary.py $OUT/$run --top 45
  rm -rf $OUT/$run/trace
done
