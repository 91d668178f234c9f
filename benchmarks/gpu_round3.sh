#!/usr/bin/env bash
# Round 3 on two H200s: single-GPU remat variants (custom-VJP RMSNorm), then 2-GPU scaling.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
B="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench.jsonl"
CUDA_VISIBLE_DEVICES=0 $B --runs "model.remat=none" "model.remat=dots_saveable" "model.remat=dots_attention_saveable" 2>&1 | tail -4
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml model.remat=dots_attention_saveable --out $OUT --trace 2>&1 | grep -v "^W\|Warning" | tail -5
$B --runs "mesh.data=2 train.batch_size=16 model.remat=dots_attention_saveable" \
  "mesh.data=1 mesh.fsdp=2 train.batch_size=16 model.remat=dots_attention_saveable" \
  "mesh.data=1 mesh.tensor=2 train.batch_size=8 model.remat=dots_attention_saveable" 2>&1 | tail -5
(cd $OUT && [ -d trace ] && tar czf trace.tgz trace && rm -rf trace)
