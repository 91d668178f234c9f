"""Test set-up: 8 simulated CPU devices (set before jax is imported), small shared configs."""

import os

from paxlite import xla_flags  # (imports no jax: `import paxlite` is lazy)

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# LLVM at level 1, not XLA's default 3: most tests compile more than they run. Measured on 2
# cores, a compile takes ~25% less and a step ~9% more (configs/tiny.yaml at fp8), and the
# suite in pytest-xdist's two workers ran 687 s, against 1,101 s at level 3 in one. Level 0 was
# slower (775 s: a step there takes 3.4x as long) and changed float32 results in the last
# bits, past the kernels tests' tolerance. The notebooks' kernels run at XLA's default.
xla_flags.apply_defaults(flags={"--xla_backend_optimization_level": "1"})  # a level in XLA_FLAGS wins
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per session, shared with the CLI subprocesses tests start:
# every Trainer of the same shapes compiles once, not once per test (seconds each on 2 cores).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="paxlite-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
  return REPO


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
  """One tokenized-corpus cache for the whole session (the stdlib corpus is tokenized once)."""
  path = str(tmp_path_factory.mktemp("paxlite-cache"))
  os.environ["PAXLITE_CACHE"] = path
  return path
