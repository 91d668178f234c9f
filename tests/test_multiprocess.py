"""Multi-process runs (two processes x 4 CPU devices over gloo), hybrid ICI x DCN meshes, and
joining a run from config or environment."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from paxlite import cli, xla_flags
from paxlite.config import ConfigError, DistributedConfig, MeshConfig, load_config
from paxlite.mesh import device_array, distributed_settings, initialize_distributed, mesh_sizes

# configs/tiny.yaml at the sizes the test budget allows; float32 so layouts agree to 1e-5.
TINY = ["model.d_model=64", "model.d_ff=128", "model.seq_len=32", "train.batch_size=8", "train.steps=3",
        "train.log_every=1", "eval.every=0", "checkpoint.every=0", "data.max_files=30", "mesh.fsdp=2",
        "mesh.tensor=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(repo_root, data_cache, tmp_path_factory):
  """The single-process run on 8 devices, mesh data=2 fsdp=2 tensor=2 (also builds the corpus
  cache the two processes then share)."""
  from paxlite.trainer import Trainer

  run_dir = tmp_path_factory.mktemp("single")
  cfg = load_config(os.path.join(repo_root, "configs", "tiny.yaml"), TINY + ["mesh.data=2", f"run.dir={run_dir}"])
  trainer = Trainer(cfg)
  history = trainer.train()
  return cfg, trainer, history


@pytest.fixture(scope="module")
def two_processes(repo_root, reference, tmp_path_factory):
  """The same run as two processes of 4 CPU devices each, joined over 127.0.0.1, on a hybrid
  mesh: data spans the two processes (mesh.dcn_data=2), fsdp and tensor stay inside each."""
  run_dir = tmp_path_factory.mktemp("two")
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=repo_root)
  xla_flags.simulate_cpu_devices(4, env)  # the suite's compile-speed flags stay
  args = [sys.executable, "-m", "paxlite", "train", "configs/tiny.yaml", *TINY, "mesh.data=1", "mesh.dcn_data=2",
          f"run.dir={run_dir}", f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
          "distributed.timeout_s=60"]
  procs = [subprocess.Popen(args + [f"distributed.process_id={i}"], cwd=repo_root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=240))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  return run_dir, [p.returncode for p in procs], [err for _, err in outputs]


def test_two_processes_match_the_single_process_run(reference, two_processes):
  _, _, history = reference
  run_dir, codes, stderrs = two_processes
  assert codes == [0, 0], stderrs
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]  # written once, by process 0
  np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in history], rtol=1e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in records], [r["grad_norm"] for r in history], rtol=1e-5)
  assert "over 8 cpu devices in 2 processes" in stderrs[0]
  assert "paxlite: done, step 3" in stderrs[0]
  assert "step 1" not in stderrs[1] and "paxlite: done" not in stderrs[1]  # only process 0 reports


def test_two_process_checkpoint_restores_in_one_process(reference, two_processes, assert_each_array_near):
  from paxlite.trainer import Trainer

  cfg, single, _ = reference
  run_dir, codes, stderrs = two_processes
  assert codes == [0, 0], stderrs
  restored = Trainer(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir))))
  assert restored.restore() == 3
  # The processes' all-reduces (gloo) sum in another order than one process does (one
  # embedding weight ended 2e-4 of itself apart); whole arrays stay within 3e-7 of their norms.
  assert_each_array_near(restored.state, single.state, 1e-5)
  # The data loader resumes where both processes together left off.
  np.testing.assert_array_equal(next(restored.loader()), next(single.loader()))


# -- hybrid meshes: device order -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  slice_index: int | None = None
  platform: str = "cpu"
  device_kind: str = "fake"


def _process_grid(array: np.ndarray) -> np.ndarray:
  return np.vectorize(lambda d: d.process_index)(array)


def test_hybrid_mesh_keeps_inner_axes_inside_a_process():
  devices = [FakeDevice(i, i // 4) for i in range(8)]
  array = device_array(MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2), devices)
  assert array.shape == (2, 2, 1, 2)
  assert (_process_grid(array)[0] == 0).all() and (_process_grid(array)[1] == 1).all()
  array = device_array(MeshConfig(data=2, fsdp=1, tensor=2, dcn_fsdp=2), devices)
  assert array.shape == (2, 2, 1, 2)  # fsdp = 1 inside x 2 across: process = fsdp index
  np.testing.assert_array_equal(_process_grid(array)[:, :, 0, 0], [[0, 1], [0, 1]])


def test_hybrid_mesh_groups_slices_then_processes_then_blocks():
  # Two TPU slices of two hosts: slices are the granules.
  devices = [FakeDevice(i, i // 4, slice_index=i // 8) for i in range(16)]
  array = device_array(MeshConfig(data=-1, fsdp=4, dcn_data=2), devices)
  assert array.shape == (4, 4, 1, 1)
  slices = np.vectorize(lambda d: d.slice_index)(array)
  assert (slices[:2] == 0).all() and (slices[2:] == 1).all()
  # Four one-GPU-per-process tasks on two hosts: consecutive ranks share a host.
  devices = [FakeDevice(i, i) for i in range(4)]
  array = device_array(MeshConfig(data=1, fsdp=2, dcn_data=2), devices)
  np.testing.assert_array_equal(_process_grid(array)[:, :, 0, 0], [[0, 1], [2, 3]])
  # One process simulating two hosts: consecutive device blocks.
  devices = [FakeDevice(i, 0) for i in range(8)]
  ids = np.vectorize(lambda d: d.id)(device_array(MeshConfig(data=1, tensor=4, dcn_stage=2), devices))
  np.testing.assert_array_equal(ids[0, 0, :, :], [[0, 1, 2, 3], [4, 5, 6, 7]])
  with pytest.raises(ConfigError, match="3 process"):
    device_array(MeshConfig(data=1, fsdp=2, dcn_data=2), [FakeDevice(i, i % 3) for i in range(4)])


def test_mesh_sizes_multiply_ici_by_dcn():
  assert mesh_sizes(MeshConfig(data=-1, fsdp=2, dcn_data=2, dcn_stage=2), 32) == {
      "data": 8, "fsdp": 2, "stage": 2, "tensor": 1}
  with pytest.raises(ConfigError, match="mesh.dcn_"):
    mesh_sizes(MeshConfig(dcn_data=3), 8)
  with pytest.raises(ConfigError, match="4 devices in each of 2 slices or hosts"):
    mesh_sizes(MeshConfig(data=8, dcn_fsdp=2), 8)


def test_dcn_stage_counts_as_pipeline_stages():
  with pytest.raises(ConfigError, match=r"mesh.stage=1 x mesh.dcn_stage=2"):
    load_config(None, {"model.num_layers": 3, "mesh.dcn_stage": 2, "pipeline.microbatches": 2})


# -- joining a run --------------------------------------------------------------------------


def test_distributed_settings_come_from_config_then_environment(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed_settings(DistributedConfig()) == ("10.0.0.1:1234", 4, 3)
  assert distributed_settings(DistributedConfig(process_id=1)) == ("10.0.0.1:1234", 4, 1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(ConfigError, match=r"\$JAX_NUM_PROCESSES: expected an integer"):
    distributed_settings(DistributedConfig())


def test_single_process_runs_do_not_initialise(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
               "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(name, raising=False)
  assert initialize_distributed(DistributedConfig()) is False
  assert initialize_distributed(DistributedConfig(num_processes=1)) is False
  with pytest.raises(ConfigError, match="distributed.coordinator, distributed.process_id: needed"):
    initialize_distributed(DistributedConfig(num_processes=2))


@pytest.mark.parametrize("override,message", [
    ("distributed.coordinator=localhost", "distributed.coordinator: expected host:port"),
    ("distributed.process_id=2", None),
    ("mesh.dcn_data=0", "mesh.dcn_data: expected a positive number"),
])
def test_distributed_config_errors(override, message):
  overrides = [override] + (["distributed.num_processes=2"] if message is None else [])
  with pytest.raises(ConfigError, match=message or "distributed.process_id: 2 is not below"):
    load_config(None, overrides)


def test_cli_incomplete_distributed_settings_are_one_line(repo_root, tmp_path, capsys, monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  code = cli.main(["train", os.path.join(repo_root, "configs", "tiny.yaml"), "distributed.num_processes=2",
                   f"run.dir={tmp_path / 'run'}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("paxlite: error: distributed.coordinator")
  assert not (tmp_path / "run").exists()


# -- launch files -----------------------------------------------------------------------------


def test_launch_files_are_valid_shell_and_name_real_config_keys(repo_root):
  import glob
  import re

  from paxlite.config import describe_keys

  keys = {key for key, _, _ in describe_keys()}
  files = sorted(glob.glob(os.path.join(repo_root, "configs", "launch", "*")))
  assert {os.path.basename(f) for f in files} >= {"slurm-gpu.sbatch", "tpu-gcloud.sh"}
  for path in files:
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    used = set(re.findall(r"\b([a-z_]+\.[a-z_]+)=", text))
    assert used and used <= keys, (path, used - keys)
    assert "paxlite plan" in text and "paxlite train" in text
