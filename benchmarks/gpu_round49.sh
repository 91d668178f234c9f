#!/usr/bin/env bash
# Round 49, one GPU, only on an H200 (the goal is set on one): this code's bf16 step,
# two interleaved pairs against the previous session's commit (base.tar: `git archive
# --prefix=base/ 4683d11`, untracked). On any other GPU it prints the GPU's name and stops,
# unless ANY_GPU=1. Not run in sessions 8-9: no H200 machine could be started. Round 50 runs
# it again (ROUND=50: its own output files).
source benchmarks/gpu_lib.sh
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $gpu"
case "$gpu" in *H200*) ;; *) [ "${ANY_GPU:-0}" = 1 ] || { echo "not an H200: nothing run"; exit 0; } ;; esac
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
base_pairs 2 "${ROUND:-49}"
