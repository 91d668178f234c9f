"""Test set-up: 8 simulated CPU devices (set before jax is imported), small shared configs."""

import os
import subprocess
import sys

from paxlite import xla_flags  # (imports no jax: `import paxlite` is lazy)

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Most tests compile more than they run, so the CPU backend is set to compile fast:
# - LLVM at level 1, not XLA's default 3. Measured on 2 cores, a compile takes ~25% less and a
#   step ~9% more (configs/tiny.yaml at fp8), and the suite in pytest-xdist's two workers ran
#   687 s, against 1,101 s at level 3 in one. Level 0 was slower (775 s: a step there takes 3.4x
#   as long) and changed float32 results in the last bits, past the kernels tests' tolerance.
# - XLA:CPU's older loop-fusion emitters instead of its MLIR fusion emitters (jaxlib 0.10's
#   default): three test-shaped configs compile 17-30% faster (benchmarks/cpu_compile_flags.py),
#   and the suite ran 561 s instead of 658 s (session 11).
# A flag already in XLA_FLAGS wins. The notebooks' kernels get these too (tests/test_notebooks).
COMPILE_FAST = {"--xla_backend_optimization_level": "1", "--xla_cpu_use_fusion_emitters": "false"}


def _xla_accepts(flags: str) -> bool:
  """Whether this jaxlib starts with `flags`: XLA aborts a process whose XLA_FLAGS name a flag
  it does not know, and a later jaxlib may drop the emitters switch. Asked once, in the process
  that starts the workers (they inherit its XLA_FLAGS, which then name the flags)."""
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True)
  return probe.returncode == 0


if "--xla_cpu_use_fusion_emitters" not in xla_flags.named() and not _xla_accepts("--xla_cpu_use_fusion_emitters=false"):
  COMPILE_FAST.pop("--xla_cpu_use_fusion_emitters")
xla_flags.apply_defaults(flags=COMPILE_FAST)
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


def _assert_each_array_near(got, want, rtol: float) -> None:
  """Each array of the tree `got` within `rtol` of its norm of the same array in `want`.

  Whole arrays, not element by element: two layouts sum in different orders, and Adam's
  division by sqrt(v) magnifies that in an element whose gradient cancels to near zero, while
  a wrong shard, a lost step or a layer out of place moves an array by about its whole norm."""
  import jax
  import numpy as np

  got, want = jax.device_get(got), jax.device_get(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    off = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert off < rtol, f"{jax.tree_util.keystr(path)}: off by {off:.2e} of its norm (allowed {rtol:.0e})"


@pytest.fixture(scope="session")
def assert_each_array_near():
  """`assert_each_array_near(got_tree, want_tree, rtol)`: see _assert_each_array_near."""
  return _assert_each_array_near
