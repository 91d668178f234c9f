"""Scale-out on one multi-GPU host (issue 10): 3-D parallelism of configs/bench-1.7b.yaml and
configs/bench-13b.yaml on N = 8, 4 or 2 GPUs, measured with `paxlite bench` and set beside what
`paxlite plan` predicted for the same runs.

  python3 benchmarks/scaleout.py plan --devices 4 [--search]   # CPU only: predictions, saved to
                                                               #   benchmarks/scaleout_plans.json
  python3 benchmarks/scaleout.py measure --devices 4 [--one-gpu 48009] [--out DIR]   # on the GPUs
  python3 benchmarks/scaleout.py smoke --devices 8             # the same rows, a tiny model, N CPU devices

`measure` runs every row in its own `paxlite bench` process (fresh peak-memory counters),
appends each result to DIR/scaleout-N.jsonl ($OUT or /tmp/out) as soon as it is in, and prints
tokens/s total and per device, scaling efficiency (per-device tokens/s over the one-GPU figure
of the same model and remat policy: 48,009 tokens/s, benchmarks/RESULTS.md round 4a), MFU, step
time, peak memory, and the saved plan's memory and step time with its error. Rows stop starting
after --budget-s seconds, so one device call of 10 minutes always ends with its results.

The rows. configs/bench-1.7b.yaml runs with model.remat=dots_attention_saveable (the best
one-GPU policy) at 8 sequences per device: global batch 8 N / tensor (tensor-parallel devices
share their sequences). Pipelines take 8 micro-batches per step, as on two GPUs (round 4).
The issue's 8-GPU rows and their analogues on 4 and 2 GPUs:

  8 GPUs (the issue)            4 GPUs                        2 GPUs
  data=8                        data=4                        data=2
  fsdp=8                        fsdp=4                        fsdp=2
  data=2 fsdp=2 tensor=2        fsdp=2 tensor=2               tensor=2
  stage=2 data=4, circular      stage=2 data=2, circular      stage=2, circular
  stage=2 fsdp=2 tensor=2       stage=2 tensor=2              stage=2 (gpipe)

Pure data and fsdp rows keep their one axis over all devices: those are the >= 90% scaling
targets. A mixed row keeps the group sizes of its model-parallel axes (tensor=2, stage=2) as on
8 GPUs, so its per-device matmul shapes and its tensor/pipeline collectives are the 8-GPU
row's, and gives up the replica axis first: data (the 3-D row: fsdp=2 and tensor=2 keep their
group of 2; the gradient all-reduce over data that is dropped is what the data row measures),
then fsdp (the pipeline 3-D row: stage=2 tensor=2; the fsdp gathers it drops are the fsdp row's).
On 2 GPUs only one axis of 2 is left in each row. The 8-GPU row stage=2 fsdp=2 tensor=2 runs the
default gpipe schedule (the issue names circular only for stage=2 data=4).

configs/bench-13b.yaml (13.2B parameters: 211 GB of float32 parameters, gradients and Adam
moments, so it cannot train on one H200) runs at 4 sequences per device with fsdp=N and with
tensor=N/2 fsdp=2, 5 timed steps after 2 warm-up steps. At N=2 only fsdp=2 is listed: it does
not fit (plan), and `measure` skips rows the saved plan says do not fit (--force runs them).

Every mode sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 unless it is set (JAX's default 0.75 leaves
105.75 of an H200's 141 GB; 13B fsdp=4 plans at 104 GB), so plans judge fitting against the
memory the runs get.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from paxlite import xla_flags  # noqa: E402
from paxlite.bench import run_in_subprocesses  # noqa: E402
from paxlite.config import load_config  # noqa: E402
from plan_vs_measured import plan  # noqa: E402  (this directory is on sys.path when run as a script)

BENCH_1_7B, BENCH_13B = "configs/bench-1.7b.yaml", "configs/bench-13b.yaml"
PLANS = os.path.join(REPO, "benchmarks", "scaleout_plans.json")
CIRCULAR = ("pipeline.microbatches=8", "pipeline.schedule=circular", "pipeline.repeats=2")
GPIPE = ("pipeline.microbatches=8",)
MESHES_1_7B = {
    8: [(dict(data=8), ()), (dict(fsdp=8), ()), (dict(data=2, fsdp=2, tensor=2), ()),
        (dict(stage=2, data=4), CIRCULAR), (dict(stage=2, fsdp=2, tensor=2), GPIPE)],
    4: [(dict(data=4), ()), (dict(fsdp=4), ()), (dict(fsdp=2, tensor=2), ()),
        (dict(stage=2, data=2), CIRCULAR), (dict(stage=2, tensor=2), GPIPE)],
    2: [(dict(data=2), ()), (dict(fsdp=2), ()), (dict(tensor=2), ()), (dict(stage=2), CIRCULAR),
        (dict(stage=2), GPIPE)],
}
MESHES_13B = {8: [dict(fsdp=8), dict(fsdp=2, tensor=4)], 4: [dict(fsdp=4), dict(fsdp=2, tensor=2)], 2: [dict(fsdp=2)]}
# The smoke's model: both configs shrunk to a 4-layer d_model 64 model (4 layers: stage=2 x
# repeats=2; 4 heads and 4 kv heads: tensor=4) with every mesh, batch and pipeline key unchanged.
TINY = ("model.num_layers=4", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=4", "model.d_ff=128",
        "model.vocab_size=256", "model.seq_len=32")


@dataclasses.dataclass(frozen=True)
class Row:
  """One run of the table: a config, a mesh over all N devices, sequences per device."""

  config: str
  mesh: dict[str, int]
  per_device: int
  pipeline: tuple[str, ...] = ()
  steps: int = 10
  warmup: int = 3

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def batch(self) -> int:
    """Global batch: `per_device` sequences on every device, tensor-parallel devices sharing theirs."""
    return self.per_device * self.devices // self.mesh.get("tensor", 1)

  @property
  def name(self) -> str:
    model = "13B" if self.config == BENCH_13B else "1.7B"
    mesh = " ".join(f"{a}={s}" for a, s in self.mesh.items())
    schedule = " circular" if "pipeline.schedule=circular" in self.pipeline else (" gpipe" if self.pipeline else "")
    return f"{model} {mesh}{schedule}"

  def overrides(self) -> list[str]:
    mesh = {"data": 1, "fsdp": 1, "stage": 1, "tensor": 1, **self.mesh}
    out = [f"mesh.{a}={s}" for a, s in mesh.items()] + [f"train.batch_size={self.batch}"]
    if self.config == BENCH_1_7B:
      out.append("model.remat=dots_attention_saveable")  # explicit: round 9 ran before it was the default
    return out + list(self.pipeline)

  def command(self, extra: tuple[str, ...] = ()) -> str:
    return (f"python3 -m paxlite bench {self.config} {' '.join(self.overrides() + list(extra))} "
            f"--steps {self.steps} --warmup {self.warmup}")


def rows(n: int) -> list[Row]:
  """The table for N devices, in the order it is measured: data and fsdp first (the scaling
  targets), the 3-D row, the 13B, and the pipelines (slowest, and measured on 2 GPUs before) last,
  where a spent --budget-s cuts first."""
  if n not in MESHES_1_7B:
    raise SystemExit(f"scaleout: --devices must be one of {sorted(MESHES_1_7B)}, got {n}")
  small = [Row(BENCH_1_7B, mesh, 8, pipe) for mesh, pipe in MESHES_1_7B[n]]
  large = [Row(BENCH_13B, mesh, 4, steps=5, warmup=2) for mesh in MESHES_13B[n]]
  return small[:3] + large + small[3:]


# ---------------------------------------------------------------------------------------
# Planner predictions (CPU)
# ---------------------------------------------------------------------------------------


def predict(row: Row) -> dict[str, Any]:
  """`paxlite plan` of one row on row.devices simulated CPU devices, as a JSON-able record."""
  start = time.perf_counter()
  p = plan(row.config, row.overrides(), row.devices)
  wall = time.perf_counter() - start
  if isinstance(p, str):
    return {"row": row.name, "error": p}
  seq = load_config(row.config).model.seq_len
  step = p.estimate.step_s
  return {"row": row.name, "memory_gb": p.memory.total / 1e9, "cost_model_gb": p.estimate.memory / 1e9,
          "usable_gb": p.hardware.usable_memory / 1e9, "fits": p.fits, "step_s": step,
          "tokens_per_s_per_device": row.batch * seq / step / row.devices,
          "mfu": p.estimate.model_flops / step / p.hardware.peak_flops, "plan_wall_s": wall,
          "command": f"python3 -m paxlite plan {row.config} {' '.join(row.overrides())} --devices {row.devices}"}


def plan_table(predictions: list[dict[str, Any]]) -> str:
  header = (f"{'row':<40} {'plan GB':>8} {'cost GB':>8} {'fits':>5} {'step s':>7} {'tok/s/dev':>10} {'MFU':>6} "
            f"{'wall s':>6}")
  lines = [header, "-" * len(header)]
  for p in predictions:
    if "error" in p:
      lines.append(f"{p['row']:<40} {p['error']}")
      continue
    lines.append(f"{p['row']:<40} {p['memory_gb']:>8.2f} {p['cost_model_gb']:>8.2f} {'yes' if p['fits'] else 'NO':>5} "
                 f"{p['step_s']:>7.3f} {p['tokens_per_s_per_device']:>10,.0f} {100 * p['mfu']:>5.1f}% "
                 f"{p['plan_wall_s']:>6.1f}")
  return "\n".join(lines)


def search(config: str, batch: int, n: int, rows_shown: int) -> str:
  """The head of `paxlite plan CONFIG train.batch_size=B --devices N --search` (its ranking)."""
  cmd = [sys.executable, "-m", "paxlite", "plan", config, f"train.batch_size={batch}", "--devices", str(n), "--search"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  lines = proc.stdout.strip().splitlines()
  shown = lines[:2 + rows_shown] + lines[-3:] if len(lines) > rows_shown + 5 else lines
  return f"$ python3 -m paxlite plan {config} train.batch_size={batch} --devices {n} --search\n" + "\n".join(
      shown or [proc.stderr.strip()])


def load_plans(n: int) -> dict[str, dict[str, Any]]:
  if not os.path.exists(PLANS):
    return {}
  with open(PLANS, encoding="utf-8") as f:
    return json.load(f).get(str(n), {})


def save_plans(n: int, predictions: list[dict[str, Any]]) -> None:
  saved: dict[str, Any] = {}
  if os.path.exists(PLANS):
    with open(PLANS, encoding="utf-8") as f:
      saved = json.load(f)
  saved[str(n)] = {p["row"]: p for p in predictions}
  with open(PLANS, "w", encoding="utf-8") as f:
    json.dump(saved, f, indent=1, sort_keys=True)
    f.write("\n")


# ---------------------------------------------------------------------------------------
# Measuring (GPUs, or the CPU smoke)
# ---------------------------------------------------------------------------------------


def measure(table: list[Row], out_path: str, *, extra: tuple[str, ...] = (), steps: int | None = None,
            warmup: int | None = None, budget_s: float = 1e9, skip: dict[str, str] | None = None) -> list[dict]:
  """Benchmarks each row in a fresh process and appends its record to `out_path` at once."""
  start, results = time.perf_counter(), []
  for row in table:
    row = dataclasses.replace(row, steps=steps or row.steps, warmup=row.warmup if warmup is None else warmup)
    reason = (skip or {}).get(row.name)
    if reason is None and time.perf_counter() - start > budget_s:
      reason = f"not run: the {budget_s:.0f} s budget was spent"
    if reason:
      record = {"run": " ".join(row.overrides()), "error": reason}
    else:
      [record] = run_in_subprocesses(row.config, [], [" ".join(row.overrides() + list(extra))], steps=row.steps,
                                     warmup=row.warmup)
    record.update(row=row.name, config=row.config, batch=row.batch, command=row.command(extra))
    with open(out_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    results.append(record)
  return results


def _ranks(records: list[dict[str, Any]], key) -> dict[str, int]:
  """Rank of each record among those of the same model: 1 + how many are faster per device
  (equal figures share a rank, as the cost model's data and fsdp rows often do)."""
  out: dict[str, int] = {}
  for model in ("1.7B ", "13B "):
    speeds = {r["row"]: key(r) for r in records if r["row"].startswith(model) and key(r) is not None}
    out.update({row: 1 + sum(other > speed for other in speeds.values()) for row, speed in speeds.items()})
  return out


def measured_table(results: list[dict[str, Any]], plans: dict[str, dict[str, Any]], one_gpu: float | None) -> str:
  """Measured figures with the plan's beside them; rank = per-device speed among the same model's
  rows, measured / planned."""
  measured_rank = _ranks(results, lambda r: r.get("tokens_per_s_per_device"))
  planned_rank = _ranks([p for p in plans.values() if "error" not in p], lambda p: p["tokens_per_s_per_device"])
  header = (f"{'row':<34} {'batch':>5} {'tokens/s':>9} {'tok/s/dev':>9} {'scaling':>7} {'MFU':>6} {'step s':>7} "
            f"{'comp s':>6} {'peak GB':>7} {'loss':>6} | {'plan GB':>7} {'error':>7} {'plan s':>6} {'p tok/s/dev':>11} {'rank':>5}")
  lines = [header, "-" * len(header)]
  for r in results:
    p = plans.get(r["row"], {})
    if "error" in r:
      lines.append(f"{r['row']:<34} {r['error'][:110]}")
      continue
    peak = r.get("peak_memory_gb") or r.get("compiled_memory_gb")
    scaling = (f"{100 * r['tokens_per_s_per_device'] / one_gpu:.1f}%"
               if one_gpu and r["row"].startswith("1.7B ") else "-")
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    line = (f"{r['row']:<34} {r['batch']:>5} "
            f"{r['tokens_per_s']:>9,.0f} {r['tokens_per_s_per_device']:>9,.0f} {scaling:>7} {mfu:>6} "
            f"{r['step_time_s']:>7.3f} {r['compile_s']:>6.1f} {peak or float('nan'):>7.2f} {r['loss']:>6.3f} |")
    if "memory_gb" in p:
      error = f"{100 * (p['memory_gb'] - peak) / peak:+.1f}%" if peak else "-"
      line += (f" {p['memory_gb']:>7.2f} {error:>7} {p['step_s']:>6.3f} {p['tokens_per_s_per_device']:>11,.0f} "
               f"{measured_rank.get(r['row'], '-')}/{planned_rank.get(r['row'], '-')}")
    lines.append(line)
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("mode", choices=("plan", "measure", "smoke"))
  parser.add_argument("--devices", type=int, required=True, help="N: 8, 4 or 2")
  parser.add_argument("--search", action="store_true", help="plan: also rank layouts with paxlite plan --search")
  parser.add_argument("--search-rows", type=int, default=8, help="search: ranked rows shown per model")
  parser.add_argument("--one-gpu", type=float, default=48009.0,
                      help="one-GPU tokens/s of configs/bench-1.7b.yaml, dots_attention_saveable (RESULTS.md 4a)")
  parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"), help="directory of scaleout-N.jsonl")
  parser.add_argument("--budget-s", type=float, default=500.0, help="measure: start no row after this many seconds")
  parser.add_argument("--force", action="store_true", help="measure: also run rows the saved plan says do not fit")
  args = parser.parse_args()
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # before any plan reads it
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))  # the bench processes
  n = args.devices
  table = rows(n)
  os.chdir(REPO)

  if args.mode == "plan":
    predictions = []
    for row in table:
      print(f"scaleout: planning {row.name}", file=sys.stderr, flush=True)
      predictions.append(predict(row))
    save_plans(n, predictions)
    print(f"plans for {n} devices (XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']}), "
          f"saved to {os.path.relpath(PLANS, REPO)}")
    print(plan_table(predictions))
    if args.search:
      for config, per_device in ((BENCH_1_7B, 8), (BENCH_13B, 4)):
        print()
        print(search(config, per_device * n, n, args.search_rows))
    return 0

  os.makedirs(args.out, exist_ok=True)
  out_path = os.path.join(args.out, f"scaleout-{n}{'-cpu' if args.mode == 'smoke' else ''}.jsonl")
  if args.mode == "smoke":  # every bench process lays its mesh over N simulated CPU devices
    xla_flags.simulate_cpu_devices(n)
    results = measure(table, out_path, extra=TINY, steps=2, warmup=1)
    print(f"CPU smoke, {n} simulated devices, tiny model ({' '.join(TINY)}); not a speed figure")
    print(measured_table(results, {}, None))
  else:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(n))))
    plans = load_plans(n)
    skip = {} if args.force else {
        name: f"not run: the plan says {p['memory_gb']:.1f} GB does not fit {p['usable_gb']:.1f} GB (--force runs it)"
        for name, p in plans.items() if p.get("fits") is False}
    results = measure(table, out_path, budget_s=args.budget_s, skip=skip)
    print(f"{n} devices; scaling = tokens/s per device / {args.one_gpu:,.0f} (one GPU, 1.7B rows); plan from "
          f"{os.path.relpath(PLANS, REPO) if plans else 'nowhere (run the plan mode first)'}; results in {out_path}")
    print(measured_table(results, plans, args.one_gpu))
  return 1 if any("error" in r and not r["error"].startswith("not run") for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
