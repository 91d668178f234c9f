#!/usr/bin/env bash
# Round 35, one GPU: the norm kernels' block sizes again, now with the backward loop's
# software-pipelining depth (Triton num_stages); then the train step with the fastest
# backward variant for q/k/v's three-part gradient against the module's defaults, interleaved.
# norm_kernels._NUM_STAGES (Triton num_stages for the backward) existed for this round only: it
# changed nothing and was removed, so this script no longer runs as it stands.
source benchmarks/gpu_lib.sh
timeout 200 python3 benchmarks/norm_kernels.py 2>&1 | grep -v "^W\|Warning" | tee $OUT/norm_kernels35.txt | tail -45
PICK=$(grep "dy = 3 parts" $OUT/norm_kernels35.txt | grep pallas | grep -v failed | sort -k12,12n | head -1 \
  | sed -E 's/.*pallas r([0-9]+)\/([0-9]+) w([0-9]+) s([0-9-]+).*/\1 \2 \3 \4/')
echo "fastest 3-part backward: $PICK"
step() {  # rows program_rows warps stages: the bf16 step with those backward block sizes
  python3 - "$@" <<'PY' 2>&1 | grep -v "^W\|Warning" | grep "tokens_per_s\|Error" | tail -1 | cut -c1-200
import runpy, sys
import paxlite.models.norm_kernels as nk
rows, program_rows, warps, stages = sys.argv[1:5]
nk._BWD_ROWS, nk._BWD_PROGRAM_ROWS, nk._NUM_WARPS = int(rows), int(program_rows), int(warps)
nk._NUM_STAGES = None if stages == "-" else int(stages)
sys.argv = ["paxlite", "bench", "configs/bench-1.7b.yaml", "--steps", "10", "--warmup", "2",
            "model.scan_layers=false", "model.remat=operands_saveable", "--out", "/tmp/out35.jsonl"]
runpy.run_module("paxlite", run_name="__main__")
PY
}
if [ -n "$PICK" ]; then
  step 4 64 4 - ; step $PICK ; step 4 64 4 - ; step $PICK
fi
cp /tmp/out35.jsonl $OUT/ 2>/dev/null || true
