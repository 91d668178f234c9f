"""benchmarks/scaleout.py: every row of the scale-out table is a valid layout of its config on
its N devices (shapes divide, the mesh covers the devices) with the stated sequences per device."""

import importlib.util
import os
import sys

import pytest

from paxlite.config import load_config
from paxlite.shardings import explain_sharding

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def scaleout():
  sys.path.insert(0, BENCHMARKS)  # scaleout.py imports plan_vs_measured beside it
  try:
    spec = importlib.util.spec_from_file_location("scaleout", os.path.join(BENCHMARKS, "scaleout.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaleout"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(BENCHMARKS)
  return module


@pytest.mark.parametrize("n", [2, 4, 8])
def test_rows_are_valid_layouts(scaleout, repo_root, n):
  rows = scaleout.rows(n)
  assert [r.config for r in rows].count(scaleout.BENCH_1_7B) == 5
  assert len({r.name for r in rows}) == len(rows)
  for row in rows:
    cfg = load_config(os.path.join(repo_root, row.config), row.overrides())
    sizes = {a: getattr(cfg.mesh, a) for a in ("data", "fsdp", "stage", "tensor")}
    assert row.devices == n and sizes["data"] * sizes["fsdp"] * sizes["stage"] * sizes["tensor"] == n
    # Sequences each device runs: its replica's rows; tensor-parallel devices share theirs.
    assert cfg.train.batch_size * sizes["tensor"] // n == row.per_device
    assert cfg.model.remat == "dots_attention_saveable"
    explain_sharding(cfg, num_devices=n)  # raises when a dimension does not divide its mesh axes


def test_rows_outside_the_table_are_refused(scaleout):
  with pytest.raises(SystemExit, match="--devices must be one of"):
    scaleout.rows(16)
