"""The notebooks under notebooks/ run top to bottom on CPU (a failing cell fails the test), and
are committed with their outputs stripped."""

import glob
import json
import os
import sys

import nbformat
import pytest

from paxlite import xla_flags

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{os.path.basename(path)}: strip outputs"
  assert "widgets" not in nb.metadata


def test_quickstart_exists():
  assert "quickstart.ipynb" in [os.path.basename(p) for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, repo_root, data_cache, tmp_path, monkeypatch):
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  # A kernel on this very interpreter (not whatever `python3` kernel a machine has installed).
  spec_dir = tmp_path / "kernels" / "paxlite-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "paxlite test", "language": "python"}))
  km = KernelManager(kernel_name="paxlite-test",
                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
  # The kernel inherits the environment: paxlite from this checkout and the session's corpus
  # cache. matplotlib gets ipykernel's inline backend (headless: figures become PNG outputs).
  # Of XLA_FLAGS, the kernel gets the suite's compile-speed flags (tests/conftest.py) and not
  # its device count: each notebook sets its own, as a user's kernel does.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("PAXLITE_CACHE", data_cache)
  monkeypatch.delenv("MPLBACKEND", raising=False)
  monkeypatch.setenv("XLA_FLAGS", xla_flags.without(xla_flags.DEVICE_COUNT))
  monkeypatch.delenv("PAXLITE_ROOT", raising=False)

  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": os.path.dirname(path)}}).execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
                 for o in outputs)
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  if os.path.basename(path) == "quickstart.ipynb":
    # The notebook's own assert is the suite's check that configs/tiny.yaml learns from the
    # stdlib corpus (first loss over 5 nats, after 100 steps under 3, validation under 3.2).
    assert "mesh data=2 fsdp=4 stage=1 tensor=1 (8 devices)" in text  # the sharding table
    assert "step 100: loss" in text and "validation loss: fsdp layout" in text
    assert "CPU 0,4" in text  # the drawn layout: embed split over fsdp, devices 0 and 4 share a quarter
    assert len(images) == 1  # the loss curve
  if os.path.basename(path) == "numerics.ipynb":
    # Its last cell is the suite's convergence test: after 200 steps of configs/tiny.yaml at
    # seq 32, every low precision ends within 2% of float32 (it asserts that itself; here, that
    # all six runs reached the table).
    for name in ("float32", "bf16", "fp16", "fp8 current", "fp8 delayed", "fp8 delayed+head"):
      assert f"{name:16s} mean of the last 30 losses" in text, name
    assert len(images) == 1  # the curves
