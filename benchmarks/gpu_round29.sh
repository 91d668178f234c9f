#!/usr/bin/env bash
# Round 29, one H200: the norm's output handed to each consumer as its own copy, so q/k/v's
# (and gate/up's) input gradients reach the backward kernel apart and it sums them in its
# pass (round 28's profile: XLA's separate sums took 2.6 ms), against the previous commit
# (base.tar: `git archive --prefix=base/ 1b7f918`, untracked) on the same GPU.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BEST="model.scan_layers=false model.remat=operands_saveable"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --warmup 2 $BEST"
row() { grep -v "^W\|Warning" | grep "tokens_per_s\|Error\|error" | tail -2 | cut -c1-260; }
mkdir -p /tmp/base && tar -xf base.tar -C /tmp/base
timeout 70 $BENCH --out $OUT/bench29.jsonl 2>&1 | row
(cd /tmp/base/base && timeout 70 $BENCH --out $OUT/bench29_base.jsonl 2>&1 | row)
timeout 40 $BENCH --out $OUT/bench29.jsonl 2>&1 | row
