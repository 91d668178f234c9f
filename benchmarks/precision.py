"""Throughput of one config under several precision policies, and the GEMMs XLA compiled.

  PYTHONPATH=. python benchmarks/precision.py configs/bench-1.7b.yaml
  PYTHONPATH=. python benchmarks/precision.py configs/bench-1.7b.yaml --variants bf16,fp8-delayed --steps 30

For each variant: compile the train step (its time and `numerics.count_gemms` of the
compiled HLO), run `--warmup` steps, then time `--steps` steps on random tokens (no data
loader: the figure is the step alone) and print one Markdown table, ready for
benchmarks/RESULTS.md. Extra `key=value` arguments override the config for every variant.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import jax
import numpy as np

from paxlite.config import ConfigError, load_config
from paxlite.numerics import count_gemms
from paxlite.trainer import Trainer

VARIANTS = {
    "fp32": {"precision.compute": "float32"},
    "bf16": {"precision.compute": "bfloat16"},
    "fp16": {"precision.compute": "float16"},
    "fp8-current": {"precision.compute": "bfloat16", "precision.fp8": "current"},
    "fp8-delayed": {"precision.compute": "bfloat16", "precision.fp8": "delayed"},
}


def measure(config: str, overrides: list[str], variant: str, steps: int, warmup: int) -> dict:
  cfg = load_config(config, overrides + [f"{k}={v}" for k, v in VARIANTS[variant].items()])
  trainer = Trainer(cfg)
  compiled, compile_s = trainer.compile_step()
  gemms = count_gemms(compiled.as_text())
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  shape = (cfg.train.batch_size // jax.process_count(), cfg.model.seq_len + 1)
  batches = [trainer._to_global(rng.integers(0, cfg.model.vocab_size, shape)) for _ in range(2)]
  with trainer.activate():
    for i in range(warmup):
      state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, batches[i % 2])
    loss = float(metrics["loss"])  # waits for the last step
  speed = trainer._speed((time.perf_counter() - start) / steps)
  del state, compiled, trainer
  gc.collect()
  jax.clear_caches()
  return {"variant": variant, "loss": loss, "compile_s": compile_s, "gemms": gemms, **speed}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("config")
  parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
  parser.add_argument("--variants", default="bf16,fp8-current,fp8-delayed",
                      help=f"comma-separated, from {', '.join(VARIANTS)}")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args(argv)
  variants = args.variants.split(",")
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    parser.error(f"unknown variant(s) {', '.join(unknown)}; expected {', '.join(VARIANTS)}")
  try:
    rows = [measure(args.config, args.overrides, v, args.steps, args.warmup) for v in variants]
  except ConfigError as e:
    print(f"precision.py: error: {e}", file=sys.stderr)
    return 2
  device = jax.devices()[0].device_kind
  print(f"\n{args.config} {' '.join(args.overrides)} on {jax.device_count()} x {device}, jax {jax.__version__}, "
        f"{args.steps} timed steps after {args.warmup}\n")
  print("| precision | tokens/s | tokens/s/device | TFLOP/s/device | MFU | vs first | fp8 GEMMs | other GEMMs | compile s | loss |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for row in rows:
    others = ", ".join(f"{n} {k}" for k, n in sorted(row["gemms"].items()) if k != "fp8") or "0"
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
    print(f"| {row['variant']} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s_per_device']:,.0f} | "
          f"{row['tflops_per_device']:.1f} | {mfu} | {row['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | "
          f"{row['gemms'].get('fp8', 0)} | {others} | {row['compile_s']:.0f} | {row['loss']:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
