"""Damaged checkpoints are detected, reported with their path and skipped for the previous good
one; a checkpoint that cannot be written fails the run clearly and leaves the previous intact."""

import glob
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from paxlite.checkpoint import MANIFEST, CheckpointError, check_manifest, write_manifest
from paxlite.config import ConfigError, load_config
from paxlite.faults import StopSignals
from paxlite.metrics import truncate_records
from paxlite.trainer import Trainer

BASE = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.d_ff": 128, "model.seq_len": 32,
    "precision.compute": "float32", "train.batch_size": 8, "train.lr": 1e-2, "train.warmup_steps": 1,
    "train.steps": 4, "train.log_every": 1, "data.source": "synthetic", "eval.every": 0, "checkpoint.every": 2,
    "run.tensorboard": False,
}


def trainer(run_dir, **overrides):
  return Trainer(load_config(None, {**BASE, "run.dir": str(run_dir), **overrides}))


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A run with checkpoints 2 and 4, and the state checkpoint 2 holds."""
  run_dir = tmp_path_factory.mktemp("saved")
  trainer(run_dir).train()
  reader = trainer(run_dir)
  assert reader.restore(2) == 2
  return run_dir, leaves(reader.state)


def biggest(directory):
  files = glob.glob(os.path.join(directory, "state", "**", "*"), recursive=True)
  return max((f for f in files if os.path.isfile(f)), key=os.path.getsize)


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def unsealed_damage(directory):
  # Damage the manifest cannot see (it is rewritten over the damaged files): only reading notices.
  os.remove(os.path.join(directory, "state", "_METADATA"))
  write_manifest(directory, 4)


DAMAGE = {
    "truncated-array-file": (lambda d: truncate(biggest(d)), "bytes, the manifest says"),
    "flipped-byte": (lambda d: flip_byte(biggest(d)), "does not match its sha256 checksum"),
    "missing-metadata": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), "state/_METADATA is missing"),
    "missing-manifest": (lambda d: os.remove(os.path.join(d, MANIFEST)), f"{MANIFEST} is missing"),
    "truncated-loader-state": (lambda d: truncate(os.path.join(d, "data", "metadata")), "data/metadata has"),
    "unreadable-under-a-good-manifest": (unsealed_damage, "its metadata is unreadable"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_checkpoint_is_reported_and_skipped(saved, tmp_path, capsys, name):
  run_dir, state_at_2 = saved
  shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
  damage, problem = DAMAGE[name]
  damaged = os.path.join(tmp_path, "checkpoints", "4")
  damage(damaged)
  t = trainer(tmp_path)
  assert t.restore() == 2
  err = capsys.readouterr().err
  assert f"paxlite: checkpoint '{damaged}' is damaged: " in err and problem in err, err
  assert "trying the previous one" in err
  for got, want in zip(leaves(t.state), state_at_2, strict=True):
    np.testing.assert_array_equal(got, want)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  (kept,) = os.listdir(tmp_path / "corrupt_checkpoints")  # moved aside, not deleted
  assert kept.startswith("4-")


def test_without_checksums_sizes_are_still_checked(saved, tmp_path, capsys):
  shutil.copytree(saved[0], tmp_path, dirs_exist_ok=True)
  truncate(biggest(tmp_path / "checkpoints" / "4"))
  assert trainer(tmp_path, **{"checkpoint.verify": False}).restore() == 2
  assert "bytes, the manifest says" in capsys.readouterr().err


def test_no_good_checkpoint_is_an_error_not_a_fresh_start(saved, tmp_path):
  shutil.copytree(saved[0], tmp_path, dirs_exist_ok=True)
  for step in ("2", "4"):
    flip_byte(biggest(tmp_path / "checkpoints" / step))
  with pytest.raises(ConfigError, match="no usable checkpoint in .*rerun to start again from step 0"):
    trainer(tmp_path).restore()
  assert os.listdir(tmp_path / "checkpoints") == []
  assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 2


def test_training_goes_on_past_a_damaged_checkpoint(saved, tmp_path, capsys):
  shutil.copytree(saved[0], tmp_path, dirs_exist_ok=True)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    reference = f.read()
  flip_byte(biggest(tmp_path / "checkpoints" / "4"))
  history = trainer(tmp_path).train()  # resumes from 2, writes a new checkpoint 4
  assert [r["step"] for r in history] == [3, 4]
  assert "resumed from step 2" in capsys.readouterr().err
  assert check_manifest(str(tmp_path / "checkpoints" / "4")) is None
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    resumed = f.read()
  losses = lambda text: [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, text.splitlines())]  # noqa: E731
  assert losses(resumed) == losses(reference)  # bit for bit, one record per step


# TensorStore's writes still completing after Orbax closed its event loop end as unraisable
# exceptions; the CLI silences them (see cli._quiet_background_failures).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_that_cannot_be_written_fails_clearly_and_keeps_the_previous(tmp_path):
  t = trainer(tmp_path)
  t.train(steps=2)
  # The kernel refuses writes past 64 KiB (RLIMIT_FSIZE): TensorStore's array writes fail in
  # Orbax's background thread, as on a full disk.
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, limits[1]))
  try:
    with pytest.raises(CheckpointError) as info:
      t.train()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)
  message = str(info.value)
  assert message.startswith(f"checkpoint step 4 could not be written to '{tmp_path / 'checkpoints'}'")
  assert message.endswith("step 2 is the latest complete checkpoint") and "\n" not in message
  # The failed write never became a checkpoint; the previous one is whole.
  assert [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()] == ["2"]
  assert check_manifest(str(tmp_path / "checkpoints" / "2")) is None
  assert trainer(tmp_path).restore() == 2
  assert os.listdir(tmp_path / "checkpoints") == ["2"]  # the next start clears the remains


def test_a_disk_visibly_too_small_is_refused_before_writing(tmp_path, monkeypatch):
  t = trainer(tmp_path)
  t.train(steps=2)
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=64 << 10))
  with pytest.raises(CheckpointError, match=r"checkpoint step 4 could not be written to .* \(the state needs "
                                            r"[0-9.]+ MiB, the disk has 0.1 MiB free\); step 2 is the latest"):
    t.train()
  assert os.listdir(tmp_path / "checkpoints") == ["2"]  # nothing was started


def test_restoring_never_unpickles(saved, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a checkpoint was unpickled")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  assert trainer(saved[0]).restore() == 4


def test_metrics_past_the_restored_step_and_torn_lines_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
  truncate_records(str(path), 2)
  assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
  truncate_records(str(path), 0)
  assert path.read_text() == ""


def test_stop_signals_become_a_flag_and_a_second_one_is_not_caught():
  before = signal.getsignal(signal.SIGTERM)
  with StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == "SIGTERM" and stop.should_stop(0)
    assert signal.getsignal(signal.SIGTERM) is before  # the next SIGTERM is the process's again
  assert signal.getsignal(signal.SIGTERM) is before


# The child limits its own file size (RLIMIT_FSIZE) and then runs `paxlite train` as `-m` would.
LIMITED = """import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = ["paxlite", *sys.argv[1:]]
runpy.run_module("paxlite", run_name="__main__")
"""


def test_cli_reports_a_failed_write_in_one_line_and_exits_1(tmp_path, repo_root):
  args = [f"{k}={v}" for k, v in BASE.items()] + [f"run.dir={tmp_path}", "run.progress=lines", "train.log_every=100"]
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}  # its entries are over the limit too
  proc = subprocess.run([sys.executable, "-c", LIMITED, "train", "configs/tiny.yaml", *args], cwd=repo_root,
                        env=env, capture_output=True, text=True)
  assert proc.returncode == 1, proc.stderr
  last = proc.stderr.splitlines()[-1]
  assert last.startswith(f"paxlite: error: checkpoint step 2 could not be written to '{tmp_path / 'checkpoints'}'")
  assert "File too large" in last and last.endswith("no earlier checkpoint exists")
  assert [line for line in proc.stderr.splitlines() if not line.startswith(("step ", "paxlite: "))] == []


def test_one_line_keeps_the_os_error_that_a_long_message_cut():
  """TensorStore's message can put the OS error's text in the middle of a long spec; the cut
  line still names it (the CLI test above saw both cases, depending on the path's length)."""
  from paxlite.checkpoint import _one_line
  long = RuntimeError("Error writing " + "s" * 200 + " File too large " + "x" * 600 + " [os_error_code='27']")
  line = _one_line(long)
  assert len(line) < 460 and line.endswith("[File too large]")
  assert _one_line(RuntimeError("short: File too large [os_error_code='27']")) == "short: File too large [os_error_code='27']"
