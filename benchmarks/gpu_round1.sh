#!/usr/bin/env bash
# Round 1 on one H200: baseline of configs/bench-1.7b.yaml and first variants.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 benchmarks/matmul.py 2>&1 | grep -v Warning
python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml --out $OUT --trace 2>&1 | grep -v "^W\|Warning" | tail -8
python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench.jsonl --runs \
  "" "model.remat=dots_saveable" "model.attention=xla model.remat=full" 2>&1 | tail -6
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench.jsonl 2>&1 | tail -3
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer=" python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench.jsonl 2>&1 | tail -3
(cd $OUT && tar czf trace.tgz trace && rm -rf trace)
ls -la $OUT
