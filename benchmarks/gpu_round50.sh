#!/usr/bin/env bash
# Round 50, one GPU (session 10): round 49 again, this code's bf16 step in two interleaved pairs
# against 4683d11 (base.tar). On an H200 it checks the 52,500 tokens/s; with ANY_GPU=1
# on another GPU it adds pairs for the layered state's gain (session 10 ran it so on an H100).
ROUND=50 exec bash benchmarks/gpu_round49.sh
