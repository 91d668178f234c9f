"""Cold compile and step time of three test-shaped configs on 8 simulated CPU devices, under
whatever XLA_FLAGS this process gets: how the test suite's compile-speed flags were chosen
(benchmarks/RESULTS.md, session 11). No persistent compile cache, so every run compiles.

  XLA_FLAGS="--xla_backend_optimization_level=1" python benchmarks/cpu_compile_flags.py
  XLA_FLAGS="--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false" \\
      python benchmarks/cpu_compile_flags.py
"""

import os
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from paxlite.config import load_config  # noqa: E402
from paxlite.mesh import make_mesh  # noqa: E402
from paxlite.trainer import Trainer  # noqa: E402

BASE = {"model.num_layers": 8, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 16,
        "train.lr": 3e-3, "train.warmup_steps": 1, "train.steps": 4, "run.compile_cache": "none"}
CONFIGS = {
    "plain, 1 device": ({"mesh.data": 1}, 1),
    "stage2 data2 tensor2": ({"mesh.stage": 2, "mesh.data": 2, "mesh.tensor": 2, "pipeline.microbatches": 4}, 8),
    "fp8 delayed, data8": ({"mesh.data": 8, "precision.compute": "bfloat16", "precision.fp8": "delayed"}, 8),
}


def main() -> None:
  jax.config.update("jax_enable_compilation_cache", False)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 16, (16, 33)).astype(np.int32) for _ in range(4)]
  first_total = step_total = 0.0
  print(f"{'config':22s} {'first step s':>12s} {'step ms':>8s} {'loss':>9s}")
  for name, (overrides, devices) in CONFIGS.items():
    cfg = load_config(None, {**BASE, **overrides})
    start = time.perf_counter()
    trainer = Trainer(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:devices]))
    float(trainer.step(batches[0])["loss"])  # init, compile and one step
    first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[1:]:
      metrics = trainer.step(batch)
    loss = float(metrics["loss"])
    step = (time.perf_counter() - start) / (len(batches) - 1)
    first_total, step_total = first_total + first, step_total + step
    print(f"{name:22s} {first:12.2f} {1000 * step:8.1f} {loss:9.6f}", flush=True)
  print(f"{'all':22s} {first_total:12.2f} {1000 * step_total:8.1f}   XLA_FLAGS={os.environ['XLA_FLAGS']}")


if __name__ == "__main__":
  main()
