# Sourced by the per-round GPU scripts from round 30 on (`source benchmarks/gpu_lib.sh`, from
# the repository root): the environment, the output folder ($OUT, which the device tool sends
# back), the fastest one-GPU settings and the helpers every round uses.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Unrolled layers, every operand kept: the fastest bf16 step on one GPU (RESULTS.md).
BEST="model.scan_layers=false model.remat=operands_saveable"
# The JSON line (or the error) of one `paxlite bench` run, without XLA's warnings.
row() { grep -v "^W\|Warning" | grep "tokens_per_s\|Error\|error" | tail -2 | cut -c1-${1:-200}; }
# An earlier commit to compare against on the same GPU, unpacked into /tmp/base/base from the
# untracked base.tar (`git archive --prefix=base/ REV -o base.tar`, deleted after the round).
unpack_base() { mkdir -p /tmp/base && tar -xf base.tar -C /tmp/base; }
# $1 interleaved pairs of $BENCH: the earlier commit of base.tar, then this tree, each pair
# appending to $OUT/bench$2_base.jsonl and $OUT/bench$2.jsonl.
base_pairs() {
  unpack_base
  for _ in $(seq "$1"); do
    (cd /tmp/base/base && timeout 75 $BENCH --out $OUT/bench$2_base.jsonl 2>&1 | row 120)
    timeout 75 $BENCH --out $OUT/bench$2.jsonl 2>&1 | row 120
  done
}
