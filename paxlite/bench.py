"""Benchmark the compiled train step: tokens/s, model TFLOP/s and MFU per device, memory.

One run = one config: compile ahead of time (timed), warm up, then time `steps` steps with
the device synchronised at the end, on synthetic-or-configured batches staged on device
beforehand (so host data loading is not what is measured). Several configs are run each in
a fresh subprocess, so peak-memory readings and XLA flags do not leak between runs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

from paxlite.config import Config

RESULT_KEYS = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "step_time_s",
               "compile_s", "peak_memory_gb", "compiled_memory_gb")


def _peak_memory_gb(devices) -> float | None:
  peaks = []
  for device in devices:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / 1e9 if peaks else None


def _compiled_memory_gb(compiled) -> float | None:
  """Per-device bytes XLA plans for the step: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if m is None:
    return None
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return total / 1e9


def run_benchmark(cfg: Config, *, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
  """Times `steps` train steps of `cfg` after `warmup` steps; returns one result record."""
  import jax

  from paxlite.numerics import count_gemms
  from paxlite.trainer import Trainer

  trainer = Trainer(cfg)
  compiled, compile_s = trainer.compile_step()
  state = trainer.step_state(trainer.init_state())
  loader = trainer.loader()
  batches = [trainer._to_global(next(loader)) for _ in range(min(steps + warmup, 4))]
  with trainer.activate():
    for i in range(warmup):
      state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
  record: dict[str, Any] = dict(trainer._speed(elapsed / steps))
  devices = trainer.mesh.devices.flat
  record.update(
      compile_s=compile_s,
      compile_cached=trainer.compile_cache_hits > 0,  # loaded from run.compile_cache: not a compile time
      peak_memory_gb=_peak_memory_gb(list(devices)),
      compiled_memory_gb=_compiled_memory_gb(compiled),
      gemms=count_gemms(compiled.as_text()),  # {'fp8': n, 'bf16': n, ...}: are the matmuls fp8?
      loss=float(metrics["loss"]),
      devices=trainer.mesh.devices.size,
      device_kind=trainer.mesh.devices.flat[0].device_kind,
      mesh={n: int(s) for n, s in zip(trainer.mesh.axis_names, trainer.mesh.axis_sizes)},
      params=trainer.num_params,
      tokens_per_step=trainer.tokens_per_step,
      steps=steps,
      jax=jax.__version__,
  )
  return record


def run_in_subprocesses(config_path: str, base_overrides: Sequence[str], runs: Sequence[str], *,
                        steps: int, warmup: int) -> list[dict[str, Any]]:
  """Runs each `runs` entry (a space-separated override list) in its own process."""
  results = []
  for run in runs:
    overrides = list(base_overrides) + shlex.split(run)
    cmd = [sys.executable, "-m", "paxlite", "bench", config_path, *overrides, "--steps", str(steps),
           "--warmup", str(warmup), "--json"]
    print(f"paxlite bench: running {run or '(base config)'}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
      tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      results.append({"run": run, "error": f"exit {proc.returncode}: {tail}"})
    else:
      results.append({"run": run, **json.loads(lines[-1])})
  return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
  header = (f"{'run':<64} {'tokens/s':>10} {'TFLOP/s/dev':>11} {'MFU':>6} {'step s':>8} {'compile s':>9} {'peak GB':>8}"
            f" {'fp8 GEMMs':>9} {'other GEMMs':>11}")
  lines = [header, "-" * len(header)]
  for r in results:
    name = (r.get("run") or "(base)")[:64]
    if "error" in r:
      lines.append(f"{name:<64} {r['error']}")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    gemms = r.get("gemms", {})
    peak = r.get("peak_memory_gb") or r.get("compiled_memory_gb")
    lines.append(f"{name:<64} {r['tokens_per_s']:>10,.0f} {r['tflops_per_device']:>11.1f} {mfu:>6} "
                 f"{r['step_time_s']:>8.4f} {r['compile_s']:>8.1f}{'c' if r.get('compile_cached') else ' '} "
                 f"{peak if peak is None else round(peak, 2)!s:>8}"
                 f" {gemms.get('fp8', 0):>9} {sum(n for k, n in gemms.items() if k != 'fp8'):>11}")
  if any(r.get("compile_cached") for r in results):
    lines.append("c: step loaded from the compile cache (run.compile_cache), so not a compile time")
  return "\n".join(lines)
