#!/usr/bin/env bash
# Round 20, one H200: why the train step's bf16 GEMMs run at ~640-720 TFLOP/s when the same
# shapes alone run at ~800 (round 18). The SM clock and power, sampled every 100 ms by
# nvidia-smi, during 50 and 2000 back-to-back products and during a bf16 train-step bench.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader -lms 100 > $OUT/smi20.csv 2>&1 &
SMI=$!
mark() { echo "MARK $1 $(date +%s.%N)" | tee -a $OUT/marks20.txt; }
mark short; timeout 60 python3 benchmarks/gemm_shapes.py --shapes 1,2 --reps 50 2>&1 | grep TFLOP
mark long; timeout 90 python3 benchmarks/gemm_shapes.py --shapes 1,2 --reps 2000 2>&1 | grep TFLOP
mark bench; timeout 100 python3 -m paxlite bench configs/bench-1.7b.yaml --steps 30 \
  model.scan_layers=false model.remat=operands_saveable 2>&1 | tail -1
mark end; kill $SMI
python3 - <<'PY'
import collections, datetime
marks = [l.split() for l in open("/tmp/out/marks20.txt")]
rows = [l.strip().split(", ") for l in open("/tmp/out/smi20.csv") if l.count(",") >= 4]
def t(s): return datetime.datetime.strptime(s, "%Y/%m/%d %H:%M:%S.%f").timestamp()
spans = [(marks[i][1], float(marks[i][2]), float(marks[i + 1][2])) for i in range(len(marks) - 1)]
for name, a, b in spans:
  sel = [r for r in rows if a <= t(r[0]) <= b]
  busy = [r for r in sel if float(r[2].split()[0]) > 300]  # watts: under load
  if not busy: print(name, "no loaded samples"); continue
  clk = sorted(int(r[1].split()[0]) for r in busy); pw = sorted(float(r[2].split()[0]) for r in busy)
  reasons = collections.Counter(r[4] for r in busy)
  print(f"{name}: {len(busy)} loaded samples, SM MHz median {clk[len(clk)//2]} (min {clk[0]}, max {clk[-1]}), "
        f"W median {pw[len(pw)//2]:.0f} (max {pw[-1]:.0f}), throttle reasons {dict(reasons.most_common(3))}")
PY
