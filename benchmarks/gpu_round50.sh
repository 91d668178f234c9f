#!/usr/bin/env bash
# Round 50, one GPU (session 10): this code's bf16 step in two interleaved pairs against
# 4683d11, the commit before the layered train state (base.tar: `git archive --prefix=base/
# 4683d11`, untracked). The issue's 52,500 tokens/s is set on an H200; on any other GPU the
# pairs run only with ANY_GPU=1 (a ninth and tenth pair for the layered state's gain, and a
# check that session 9's move of the loss and optimizer code cost no speed), else it stops.
source benchmarks/gpu_lib.sh
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $gpu"
case "$gpu" in *H200*) ;; *) [ "${ANY_GPU:-0}" = 1 ] || { echo "not an H200: nothing run"; exit 0; } ;; esac
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 20 --warmup 3 $BEST"
base_pairs 2 50
