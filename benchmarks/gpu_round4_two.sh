#!/usr/bin/env bash
# Round 4b, two H200s: data / fsdp / tensor / pipeline (gpipe, circular) at 8 sequences per GPU.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench2.jsonl model.remat=dots_attention_saveable"
$B --runs "mesh.data=2 train.batch_size=16" "mesh.data=1 mesh.fsdp=2 train.batch_size=16" \
  "mesh.data=1 mesh.tensor=2 train.batch_size=8" \
  "mesh.data=1 mesh.stage=2 train.batch_size=16 pipeline.microbatches=8" \
  "mesh.data=1 mesh.stage=2 train.batch_size=16 pipeline.microbatches=8 pipeline.schedule=circular pipeline.repeats=2" 2>&1 | tail -6
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_pipelined_all_reduce=true" $B mesh.data=2 train.batch_size=16 2>&1 | tail -1
