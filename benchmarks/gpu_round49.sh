#!/usr/bin/env bash
# Round 49, one GPU, only on an H200 (the goal is set on one): this code's bf16 step,
# two interleaved pairs against the previous session's commit (base.tar: `git archive
# --prefix=base/ 4683d11`, untracked). On any other GPU it prints the GPU's name and stops.
# Not run in session 8: no H200 machine could be started.
source benchmarks/gpu_lib.sh
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $gpu"
case "$gpu" in *H200*) ;; *) echo "not an H200: nothing run"; exit 0 ;; esac
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
base_pairs 2 49
