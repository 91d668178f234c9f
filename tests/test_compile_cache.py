"""run.compile_cache: a second process with the same shapes loads its train step from the cache."""

import json
import os
import subprocess
import sys

import jax
import pytest

from paxlite import xla_flags
from paxlite.compile_cache import default_directory, use_compile_cache
from paxlite.config import ConfigError

TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.seq_len=16",
        "train.batch_size=8", "data.source=synthetic", "mesh.data=1"]


def bench(cache_dir, repo_root, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  xla_flags.simulate_cpu_devices(1, env)  # the suite's compile-speed flags stay
  out = tmp_path / "bench.jsonl"
  result = subprocess.run([sys.executable, "-m", "paxlite", "bench", "configs/tiny.yaml", "--steps", "1",
                           "--out", str(out), *TINY, f"run.compile_cache={cache_dir}"],
                          capture_output=True, text=True, cwd=repo_root, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  return [json.loads(line) for line in out.read_text().splitlines()][-1]


def test_second_process_loads_the_step_from_the_cache(repo_root, tmp_path):
  cache = tmp_path / "cache"
  first = bench(cache, repo_root, tmp_path)
  assert not first["compile_cached"]
  assert any(cache.iterdir())  # the compiled step (and jax's other executables) were written
  second = bench(cache, repo_root, tmp_path)
  assert second["compile_cached"]
  assert second["loss"] == first["loss"]


def test_settings(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("PAXLITE_CACHE", str(tmp_path / "px"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert use_compile_cache("none") is None
    assert use_compile_cache("auto") == default_directory() == str(tmp_path / "px" / "jax")
    assert os.path.isdir(default_directory())
    assert use_compile_cache("auto") == default_directory()  # a configured directory stays
    assert use_compile_cache(str(tmp_path / "mine")) == str(tmp_path / "mine")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="run.compile_cache"):
      use_compile_cache(str(tmp_path / "file" / "sub"))
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
