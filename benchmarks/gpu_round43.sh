#!/usr/bin/env bash
# Round 43, one GPU: round 41 again on another machine (four interleaved pairs of 20 timed
# steps: the loss's Pallas kernel against c7de156 from base.tar), to firm up rounds 40-41's
# +0.15%.
ROUND=43 exec bash benchmarks/gpu_round41.sh
