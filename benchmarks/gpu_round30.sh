#!/usr/bin/env bash
# Round 30, one H200: the blocks' kernels carried in compute dtype from step to step
# (precision.compute_copy), with and without XLA's dynamic-slice fusion (GEMMs reading a
# layer's kernel straight out of the stacked copy); the optimized HLO and a profile of the
# carried copy with the fusion.
# precision.compute_copy was measured here and removed after round 31 (no gain without the
# dynamic-slice fusion, which XLA applies to legacy cuBLAS calls only): the key no longer exists.
source benchmarks/gpu_lib.sh
DSF="--xla_gpu_enable_dynamic_slice_fusion=true"
BENCH="python3 -m paxlite bench configs/bench-1.7b.yaml --steps 10 --out $OUT/bench30.jsonl"
timeout 80 $BENCH $BEST precision.compute_copy=false 2>&1 | row 330
timeout 80 $BENCH $BEST 2>&1 | row 330
XLA_FLAGS=$DSF timeout 80 $BENCH $BEST 2>&1 | row 330
XLA_FLAGS=$DSF timeout 80 $BENCH $BEST precision.compute_copy=false 2>&1 | row 330
timeout 60 $BENCH precision.compute_copy=false 2>&1 | row 330
XLA_FLAGS=$DSF timeout 60 $BENCH 2>&1 | row 330
XLA_FLAGS=$DSF timeout 140 python3 benchmarks/hlo_report.py configs/bench-1.7b.yaml $BEST --out $OUT/copy_dsf --trace 2>&1 \
  | grep -v "^W\|Warning" | tail -3
python3 benchmarks/trace_summary.py $OUT/copy_dsf --top 45
rm -rf $OUT/copy_dsf/trace
timeout 70 $BENCH $BEST precision.compute_copy=false 2>&1 | row 330  # the GPU's drift over the round
echo "dynamic-slice fusions in the optimized HLO: $(zcat $OUT/copy_dsf/train_step.hlo.txt.gz | grep -c '^ *%address_computation[.0-9]* = ')"
