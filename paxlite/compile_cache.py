"""jax's persistent compilation cache, as `run.compile_cache` sets it up.

A compiled train step is written to the cache directory, keyed by its HLO, the compile
options, the XLA flags and the jax version; a later process with the same shapes loads it
instead of compiling. That is what makes a restarted pod job (preemption, `kill -9`, a
resumed run) or a repeated benchmark start in seconds: the fp8 step of the 1.7B benchmark
model compiles for 90-170 s on an H200, most of it Triton GEMM autotuning, whose per-fusion
results jax also keeps there.

jax reads the directory once, at the first compile of a process; a later change is ignored.
The cache is trusted code: keep it in a directory only you can write to (jax's warning).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax

from paxlite.config import ConfigError
from paxlite.data import cache_root

_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_directory() -> str:
  """jax/ under paxlite's cache root ($PAXLITE_CACHE, else ~/.cache/paxlite), beside the
  tokenized corpora."""
  return os.path.join(cache_root(), "jax")


def use_compile_cache(setting: str) -> str | None:
  """Points jax's persistent compilation cache as `run.compile_cache` says; returns the
  directory compiled steps go to, or None if there is none.

  auto: a directory already configured for jax ($JAX_COMPILATION_CACHE_DIR or
  jax.config) stays, else `default_directory()`. none: paxlite configures nothing (jax's own
  settings still apply). Anything else is a directory, created if missing.
  """
  configured = getattr(jax.config, "jax_compilation_cache_dir", None) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if setting == "none":
    return configured or None
  if setting == "auto":
    if configured:
      return configured
    path = default_directory()
  else:
    path = os.path.abspath(os.path.expanduser(setting))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"run.compile_cache: cannot create '{path}' ({e.strerror or e})") from None
  jax.config.update("jax_compilation_cache_dir", path)
  return path


@contextlib.contextmanager
def count_cache_hits() -> Iterator[list[int]]:
  """Counts the compilations inside the block that were loaded from the persistent cache:
  `with count_cache_hits() as hits: ...; hits[0]`."""
  hits = [0]

  def listener(event: str, **_) -> None:
    if event == _HIT_EVENT:
      hits[0] += 1

  jax.monitoring.register_event_listener(listener)
  try:
    yield hits
  finally:
    unregister = getattr(jax.monitoring, "unregister_event_listener", None)
    if unregister is not None:  # older jax has none: the listener stays, counting into a dead list
      unregister(listener)
