"""How well does `paxlite plan` predict the real thing? Plans each run (compiled on this machine's
CPU, as on a laptop), then measures it with `paxlite bench` on the GPUs present, and prints
predicted against measured peak memory and step time.

  PYTHONPATH=. python benchmarks/plan_vs_measured.py configs/bench-1.7b.yaml --devices 1 \\
      --runs "mesh.data=1 model.remat=none" "mesh.data=1 model.remat=dots_attention_saveable"

Every run must use exactly --devices GPUs (the bench runs on all visible ones).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paxlite.bench import run_in_subprocesses  # noqa: E402
from paxlite.plan import Plan  # noqa: E402  (imports jax, initialises no backend)


def plan(config: str, overrides: list[str], devices: int) -> Plan | str:
  """The plan of one run from `paxlite plan --json` in a fresh process (its own CPU devices)."""
  cmd = [sys.executable, "-m", "paxlite", "plan", config, *overrides, "--devices", str(devices), "--json"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if not lines:
    return (proc.stderr.strip().splitlines() or ["no output"])[-1]
  return Plan.from_dict(json.loads(lines[-1])["plans"][0])


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("config")
  parser.add_argument("--devices", type=int, required=True, help="GPUs each run uses (all visible ones)")
  parser.add_argument("--runs", nargs="+", required=True, help="quoted override lists, one per run")
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()

  measured = run_in_subprocesses(args.config, [], args.runs, steps=args.steps, warmup=3)
  print(f"{'run':<60} {'plan GB':>8} {'model GB':>9} {'peak GB':>8} {'error':>7} {'plan s':>7} {'step s':>7}")
  for run, bench in zip(args.runs, measured):
    p = plan(args.config, shlex.split(run), args.devices)
    if isinstance(p, str) or "error" in bench:
      print(f"{run:<60} {p if isinstance(p, str) else bench['error']}")
      continue
    predicted, model, step = p.memory.total / 1e9, p.estimate.memory / 1e9, p.estimate.step_s
    peak = bench["peak_memory_gb"]
    error = f"{100 * (predicted - peak) / peak:+.1f}%" if peak else "-"
    print(f"{run:<60} {predicted:>8.2f} {model:>9.2f} {peak or float('nan'):>8.2f} {error:>7} {step:>7.3f} "
          f"{bench['step_time_s']:>7.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
