"""Compiles a config's train step and reports what XLA made of it: GEMM and attention custom
calls, fusions, collectives, memory. Optionally dumps the optimized HLO and a profiler trace.

  PYTHONPATH=. python benchmarks/hlo_report.py configs/bench-1.7b.yaml [key=value ...] [--out DIR] [--trace]
"""

import argparse
import collections
import gzip
import os
import re
import sys


def summarize(hlo: str) -> dict:
  calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
  collectives = collections.Counter(re.findall(r"= \S+ (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(", hlo))
  fusions = collections.Counter(re.findall(r'kind=(k\w+)', hlo))
  triton_gemms = len(re.findall(r'"kind":"__triton_gemm"|__triton_gemm', hlo))
  return {"custom_calls": dict(calls), "collectives": dict(collectives), "fusion_kinds": dict(fusions),
          "triton_gemm_fusions": triton_gemms}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("config")
  parser.add_argument("overrides", nargs="*")
  parser.add_argument("--out", default=None)
  parser.add_argument("--trace", action="store_true", help="profile 3 steps into OUT/trace")
  args = parser.parse_args()

  import jax

  from paxlite.config import load_config
  from paxlite.trainer import Trainer

  cfg = load_config(args.config, args.overrides)
  trainer = Trainer(cfg)
  compiled, compile_s = trainer.compile_step()
  hlo = compiled.as_text()
  report = summarize(hlo)
  print(f"compile_s {compile_s:.1f}")
  for key, value in report.items():
    print(key, value)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with gzip.open(os.path.join(args.out, "train_step.hlo.txt.gz"), "wt") as f:
      f.write(hlo)
  if args.trace and args.out:
    state = trainer.step_state(trainer.init_state())
    batch = trainer._to_global(next(trainer.loader()))
    with trainer.activate():
      for _ in range(3):
        state, m = compiled(state, batch)
      jax.block_until_ready(m)
      jax.profiler.start_trace(os.path.join(args.out, "trace"))
      for _ in range(3):
        state, m = compiled(state, batch)
      jax.block_until_ready(m)
      jax.profiler.stop_trace()
    print("trace written")


if __name__ == "__main__":
  sys.exit(main())
