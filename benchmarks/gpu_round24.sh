#!/usr/bin/env bash
# Round 24, one H200: round 23 again with the kernels' block sizes that round 23 measured
# fastest (4 rows per step, 64 per backward program), and more block sizes swept (the sweep is
# in benchmarks/norm_kernels.py).
ROUND=24 exec bash "$(dirname "$0")/gpu_round23.sh"
