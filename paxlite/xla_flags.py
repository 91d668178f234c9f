"""XLA flags paxlite sets by default, each one measured (benchmarks/RESULTS.md).

XLA reads XLA_FLAGS once, when the first jax computation initialises its backend, so these go
into the environment before that: the CLI sets them first thing, `make_mesh` before it asks
for devices. A flag already in XLA_FLAGS is never changed, so any default is overridden by
setting it there; after the backend exists, setting them has no effect (and does no harm).
Flags named xla_gpu_* only act on GPUs; other backends accept and ignore them.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping

DEFAULTS = {
    # Gradient all-reduces are combined into buckets of up to 128 MiB rather than the size
    # XLA picks by default: on two H200s with data=2 the step fell from 0.3609 to 0.3567 s
    # (90,788 -> 91,855 tokens/s, 1.89x -> 1.91x one GPU; round 10).
    "--xla_gpu_all_reduce_combine_threshold_bytes": "134217728",
    # fsdp's per-layer parameter all-gathers and gradient reduce-scatters, likewise: on two
    # H200s with fsdp=2 the step fell from 0.3484 to 0.3439 s (94,050 -> 95,288 tokens/s,
    # 1.84x -> 1.86x one GPU; round 17). XLA's smaller default buckets left ~230 all-gathers
    # per step, each a separate NCCL kernel taking SMs from the GEMMs beside it.
    "--xla_gpu_all_gather_combine_threshold_bytes": "134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes": "134217728",
}


# For `paxlite plan`, which compiles train steps on simulated CPU devices to read their memory
# and collectives, and never runs them: LLVM's optimisation of the CPU code is then wasted
# work, about 40% of each compile. What a plan reads comes from XLA's HLO passes and buffer
# assignment, before the backend's LLVM passes: the 1.7B config's 64-device plan (fsdp=8
# tensor=8) printed the same figures and compiled in 3.1 s instead of 5.3 s on 2 CPU cores.
COMPILE_ONLY = {"--xla_backend_optimization_level": "0"}


DEVICE_COUNT = "--xla_force_host_platform_device_count"


def named(environ: Mapping[str, str] = os.environ) -> set[str]:
  """The names of the flags XLA_FLAGS sets, without their values."""
  return {flag.split("=", 1)[0] for flag in environ.get("XLA_FLAGS", "").split()}


def without(name: str, environ: Mapping[str, str] = os.environ) -> str:
  """XLA_FLAGS with every setting of the flag `name` left out."""
  return " ".join(flag for flag in environ.get("XLA_FLAGS", "").split() if flag.split("=", 1)[0] != name)


def apply_defaults(environ: MutableMapping[str, str] = os.environ, flags: dict[str, str] = DEFAULTS) -> list[str]:
  """Appends each of `flags` that XLA_FLAGS does not already name; returns those added."""
  present = named(environ)
  added = [f"{name}={value}" for name, value in flags.items() if name not in present]
  if added:
    environ["XLA_FLAGS"] = " ".join(environ.get("XLA_FLAGS", "").split() + added)
  return added


def simulate_cpu_devices(count: int, environ: MutableMapping[str, str] = os.environ) -> None:
  """Makes jax (not yet initialised) run on `count` simulated CPU devices, on a GPU machine too:
  what `paxlite plan` and CPU smoke runs compile on. Replaces any device count already set."""
  environ["XLA_FLAGS"] = " ".join(without(DEVICE_COUNT, environ).split() + [f"{DEVICE_COUNT}={count}"])
  environ["JAX_PLATFORMS"] = "cpu"
