"""The training loop end to end: run directory outputs, resume, resharding restore, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from paxlite import cli
from paxlite.config import load_config
from paxlite.trainer import Trainer

RUN = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 4,
    "model.d_ff": 128, "model.seq_len": 64, "precision.compute": "float32", "train.batch_size": 8,
    "train.lr": 3e-3, "train.warmup_steps": 2, "train.log_every": 1, "data.max_files": 30,
    "eval.every": 3, "eval.batches": 2, "checkpoint.every": 3, "run.tensorboard": True,
}


def read_metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def config(run_dir, **overrides):
  return load_config(None, {**RUN, "run.dir": str(run_dir), **overrides})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_cache):
  run_dir = tmp_path_factory.mktemp("full")
  history = Trainer(config(run_dir, **{"train.steps": 6, "mesh.fsdp": 8, "mesh.data": 1})).train()
  return run_dir, history


def test_run_directory_contract(full_run):
  run_dir, history = full_run
  assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.yaml", "metrics.jsonl", "tensorboard"]
  assert load_config(os.path.join(run_dir, "config.yaml")).train.steps == 6
  records = read_metrics(run_dir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for key in ("step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "tokens_per_s_per_device",
              "tflops_per_device", "mfu"):
    assert all(key in r for r in records), key
  assert all(r["mfu"] is None for r in records)  # CPU: no peak FLOP/s known
  assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
  assert records[0]["tokens_per_s"] > 0 and records[0]["tokens_per_s_per_device"] == pytest.approx(
      records[0]["tokens_per_s"] / 8)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "tensorboard")))
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["3", "6"]
  assert history[-1]["loss"] == records[-1]["loss"]


def test_resume_continues_with_identical_losses(full_run, tmp_path):
  _, reference = full_run
  cfg = config(tmp_path, **{"train.steps": 6, "mesh.fsdp": 8, "mesh.data": 1})
  first = Trainer(cfg).train(steps=3)
  second = Trainer(cfg).train()  # a new process would do the same: finds checkpoint 3
  assert [r["step"] for r in second] == [4, 5, 6]
  losses = [r["loss"] for r in first + second]
  np.testing.assert_array_equal(losses, [r["loss"] for r in reference])


def test_resume_on_a_different_mesh(full_run, tmp_path):
  _, reference = full_run
  Trainer(config(tmp_path, **{"train.steps": 6, "mesh.fsdp": 8, "mesh.data": 1})).train(steps=3)
  resharded = Trainer(config(tmp_path, **{"train.steps": 6, "mesh.data": 2, "mesh.tensor": 4}))
  second = resharded.train()
  q = resharded.state["params"]["blocks"]["attn"]["q"]["kernel"]
  assert q.addressable_shards[0].data.shape == (2, 64, 1, 16)  # heads split 4 ways now
  np.testing.assert_allclose([r["loss"] for r in second], [r["loss"] for r in reference[3:]], rtol=1e-5)


@pytest.mark.parametrize("progress", ["lines", "none"])
def test_cli_train_writes_run(tmp_path, data_cache, capsys, progress):
  code = cli.main(["train", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                   "train.steps=2", "train.log_every=1", "eval.every=0", f"run.dir={tmp_path}",
                   "model.num_layers=1", "model.seq_len=32", f"run.progress={progress}"])
  assert code == 0
  assert len(read_metrics(tmp_path)) == 2
  err = capsys.readouterr().err
  assert "paxlite: mesh data=8" in err and "paxlite: done, step 2" in err
  # "none": the metrics reach metrics.jsonl, not the screen.
  assert ("step 2 | loss" in err) == (progress == "lines")


def test_tensorboard_events_hold_the_scalars_and_torch_stays_out(tmp_path):
  """tensorboardX imports torch when it is installed (~2 s per process); the writer keeps it
  out, torch still imports afterwards, and the event file holds the logged scalars. In a fresh
  interpreter: this one may have imported torch already."""
  script = f"""
import glob, importlib.util, json, struct, sys
from paxlite.metrics import MetricsWriter
writer = MetricsWriter({str(tmp_path)!r})
writer.write(1, {{"loss": 2.5, "lr": 0.001}})
writer.write(2, {{"loss": 2.25, "lr": 0.002}})
writer.close()
assert "torch" not in sys.modules
if importlib.util.find_spec("torch") is not None:
  import torch
  assert float(torch.ones(3).sum()) == 3.0
from tensorboardX.proto.event_pb2 import Event
data = open(glob.glob({str(tmp_path / "tensorboard" / "events.out.tfevents.*")!r})[0], "rb").read()
scalars, at = {{}}, 0
while at < len(data):  # TFRecord: length (u64), its crc (u32), the record, its crc (u32)
  (length,) = struct.unpack("<Q", data[at:at + 8])
  event = Event.FromString(data[at + 12:at + 12 + length])
  at += 16 + length
  for value in event.summary.value:
    scalars[f"{{value.tag}}@{{event.step}}"] = value.simple_value
print(json.dumps(scalars))
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  scalars = json.loads(out.stdout)
  assert scalars["loss@1"] == 2.5 and scalars["loss@2"] == 2.25
  assert scalars["lr@2"] == pytest.approx(0.002)


def run_cli(*args, cwd):
  env = dict(os.environ)
  return subprocess.run([sys.executable, "-m", "paxlite", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize("args,message", [
    (["train.stpes=3"], "unknown config key 'train.stpes'"),
    (["train.steps=many"], "train.steps: expected int"),
    (["mesh.data=3"], "mesh: data=3 x fsdp=1 x stage=1 x tensor=1 makes 3 devices, but there are 8 devices"),
    (["mesh.data=1", "mesh.tensor=8"], "'kv_heads', size 2) is not divisible by mesh axes tensor of size 8"),
    (["data.source=/no/such/file.txt"], "/no/such/file.txt"),
    (["train.batch_size=12"], "train.batch_size: 12 sequences"),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(repo_root, tmp_path, args, message):
  run_dir = tmp_path / "existing"
  run_dir.mkdir()
  (run_dir / "keep.txt").write_text("precious")
  proc = run_cli("train", "configs/tiny.yaml", f"run.dir={run_dir}", *args, cwd=repo_root)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("paxlite: error:"), proc.stderr
  assert message in lines[0]
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(run_dir)) == ["keep.txt"]


def test_cli_usage_errors(repo_root):
  proc = run_cli("train", cwd=repo_root)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  proc = run_cli("train", "configs/none.yaml", cwd=repo_root)
  assert proc.returncode == 2 and "config file 'configs/none.yaml' not found" in proc.stderr


def test_plot_draws_the_loss_curve(full_run, tmp_path):
  run_dir, _ = full_run
  out = tmp_path / "curve.png"
  assert cli.main(["plot", str(run_dir), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_of_a_directory_without_metrics_is_a_clean_error(tmp_path, capsys):
  assert cli.main(["plot", str(tmp_path)]) == 2
  assert "has no metrics.jsonl" in capsys.readouterr().err
