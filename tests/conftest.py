"""Test set-up: 8 simulated CPU devices (set before jax is imported), small shared configs."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
