"""Real processes killed mid-run: rerunning the same command resumes from the last complete
checkpoint and every logged step then equals, bit for bit, the uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from paxlite.checkpoint import check_manifest

STEPS = 60
ARGS = ["train", "configs/tiny.yaml", "model.d_model=64", "model.d_ff=128", "model.seq_len=32",
        "train.batch_size=8", f"train.steps={STEPS}", "train.warmup_steps=4", "train.log_every=1", "eval.every=0",
        "checkpoint.every=10", "checkpoint.keep=2", "data.max_files=30", "run.tensorboard=false",
        "run.progress=lines"]
KILL_AT = os.path.join(os.path.dirname(__file__), "kill_at.py")


def command(run_dir, *prefix):
  return [sys.executable, *prefix, *ARGS, f"run.dir={run_dir}"]


def start(cmd, repo_root, log):
  env = {**os.environ, "PYTHONPATH": repo_root}
  with open(log, "w") as err:  # the child holds its own copy of the descriptor
    return subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=err)


def run(cmd, repo_root, log):
  proc = start(cmd, repo_root, log)
  proc.wait(timeout=300)
  with open(log) as f:
    return proc.returncode, f.read()


def records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in map(json.loads, f)]


def wait_for_step(run_dir, step, proc, log):
  """Polls until this process has logged `step` (after its banner: metrics.jsonl is then
  already cut back to where it resumed, so older records do not count)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    try:
      if "paxlite: mesh" in open(log).read():
        with open(path) as f:
          lines = f.read().splitlines()
        if lines and json.loads(lines[-1])["step"] >= step:
          return
    except (OSError, ValueError, KeyError):
      pass
    time.sleep(0.005)
  pytest.fail(f"the run never reached step {step} (exit status {proc.poll()})")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache, repo_root):
  run_dir = tmp_path_factory.mktemp("uninterrupted")
  code, err = run(command(run_dir, "-m", "paxlite"), repo_root, run_dir / "log")
  assert code == 0, err
  result = records(run_dir)
  assert [r[0] for r in result] == list(range(1, STEPS + 1))
  return result


def complete_checkpoints(run_dir):
  """Steps whose checkpoint finished writing (a killed write stays `N.orbax-checkpoint-tmp`)."""
  return sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())


def resumed_from(err):
  return int(err.split("resumed from step ")[1].split()[0]) if "resumed from step " in err else None


def test_kill_9_at_any_moment_then_the_same_command_resumes_bit_for_bit(reference, tmp_path, repo_root):
  run_dir, log = tmp_path / "run", tmp_path / "log"
  # 1. Killed while writing metrics.jsonl's line for step 15 (checkpoint 10 may be still in flight).
  code, _ = run(command(run_dir, KILL_AT, "torn_log", "15"), repo_root, log)
  assert code == -signal.SIGKILL
  assert open(run_dir / "metrics.jsonl").read().endswith('{"step": 15, "loss": 1.')
  complete = complete_checkpoints(run_dir)
  assert complete in ([], [10])

  # 2. Killed inside the background write of checkpoint 30, while training went on past it.
  code, err = run(command(run_dir, KILL_AT, "in_write", "30"), repo_root, log)
  assert code == -signal.SIGKILL and resumed_from(err) == (complete[-1] if complete else None)
  complete = complete_checkpoints(run_dir)
  assert complete[-1] == 20  # 30 never became a checkpoint

  # 3. kill -9 from outside, wherever it lands after step 33.
  proc = start(command(run_dir, "-m", "paxlite"), repo_root, log)
  wait_for_step(run_dir, 33, proc, log)
  proc.kill()
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert resumed_from(open(log).read()) == 20
  complete = complete_checkpoints(run_dir)

  # 4. The same command again, to the end: one record per step, each equal to the reference.
  code, err = run(command(run_dir, "-m", "paxlite"), repo_root, log)
  assert code == 0, err
  assert resumed_from(err) == complete[-1]
  assert records(run_dir) == reference
  assert complete_checkpoints(run_dir) == [50, 60]


def test_sigterm_finishes_the_step_saves_and_exits_0(reference, tmp_path, repo_root):
  run_dir, log = tmp_path / "run", tmp_path / "log"
  proc = start(command(run_dir, "-m", "paxlite"), repo_root, log)
  wait_for_step(run_dir, 12, proc, log)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  last = open(log).read().strip().splitlines()[-1]
  assert last.startswith("paxlite: SIGTERM received: stopped after step ") and "rerun the same command" in last
  step = int(last.split("stopped after step ")[1].split(",")[0])
  assert 12 <= step < STEPS
  assert records(run_dir)[-1][0] == step  # the step it was in finished and was logged
  assert check_manifest(str(run_dir / "checkpoints" / str(step))) is None  # and saved, whole

  code, err = run(command(run_dir, "-m", "paxlite"), repo_root, log)
  assert code == 0 and f"resumed from step {step}" in err, err
  assert records(run_dir) == reference
