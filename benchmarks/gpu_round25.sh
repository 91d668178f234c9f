#!/usr/bin/env bash
# Round 25, nvidia-h200-x2: the fused norm kernels (model.norm_kernel=pallas, now the default
# on GPU) against xla on one GPU and on two (data=2, fsdp=2: the kernels run per device under
# shard_map); the scanned step's compile time with the kernels.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BEST="model.scan_layers=false model.remat=operands_saveable"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench25.jsonl"
row() { grep -v "^W\|Warning" | grep "norm_kernel\|Error\|error" | tail -2 | cut -c1-400; }
for kernel in xla pallas; do
  CUDA_VISIBLE_DEVICES=0 timeout 100 $BENCH $BEST model.norm_kernel=$kernel 2>&1 | row
done
CUDA_VISIBLE_DEVICES=0 timeout 100 $BENCH model.remat=operands_saveable model.norm_kernel=pallas 2>&1 | row
for mesh in "mesh.data=2" "mesh.data=1 mesh.fsdp=2"; do
  for kernel in xla pallas; do
    timeout 110 $BENCH $BEST $mesh train.batch_size=16 model.norm_kernel=$kernel 2>&1 | row
  done
done
