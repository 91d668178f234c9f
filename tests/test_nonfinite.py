"""train.on_nan: a non-finite step never touches the weights; skip, rollback and stop.

NaN enters through a real path: a batch whose token ids lie past the vocabulary (what a
corrupt shard or a tokenizer/vocabulary mismatch produces). The embedding lookup
(`jnp.take`, mode fill) turns them into NaN activations, so the loss and gradients are NaN.
"""

import os
import re

import jax
import numpy as np
import pytest

from paxlite import cli
from paxlite.config import load_config
from paxlite.faults import NonFiniteError
from paxlite.trainer import Trainer

VOCAB = 256
BASE = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.d_ff": 128, "model.seq_len": 32,
    "model.vocab_size": VOCAB, "precision.compute": "float32", "train.batch_size": 8, "train.lr": 1e-2,
    "train.warmup_steps": 1, "train.steps": 6, "train.log_every": 1, "data.source": "synthetic", "eval.every": 0,
    "checkpoint.every": 2, "run.tensorboard": False,
}


class PoisonedLoader:
  """A real TrainLoader whose batches at the global indices `bad` carry out-of-vocabulary ids."""

  def __init__(self, inner, bad):
    self.inner, self.bad = inner, bad

  @property
  def step(self):
    return self.inner.step

  def __iter__(self):
    return self

  def __next__(self):
    index = self.inner.step
    batch = next(self.inner)
    return np.full_like(batch, VOCAB + 7) if self.bad(index) else batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def trainer(run_dir, bad=lambda i: False, skipped=(), **overrides):
  t = Trainer(load_config(None, {**BASE, "run.dir": str(run_dir), **overrides}))
  t._loader = PoisonedLoader(t.loader(), bad)
  t.counters.skipped_batches.update(skipped)
  return t


def host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
  for x, y in zip(host(a), host(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def after_three_clean_steps(tmp_path_factory):
  t = trainer(tmp_path_factory.mktemp("clean"))
  t.train(steps=3)
  return jax.device_get(t.state)


@pytest.fixture(scope="module")
def without_batch_2(tmp_path_factory):
  """A clean run told from the start to leave global batch 2 out: what a rollback past it gives."""
  t = trainer(tmp_path_factory.mktemp("ref"), skipped={2})
  return t.train(), jax.device_get(t.state)


def test_skip_leaves_weights_and_optimizer_untouched(tmp_path, after_three_clean_steps):
  t = trainer(tmp_path, bad=lambda i: i == 3, **{"train.on_nan": "skip"})
  history = t.train(steps=4)
  assert [r["nan_steps"] for r in history] == [0, 0, 0, 1]
  assert np.isnan(history[3]["loss"])
  state = jax.device_get(t.state)
  assert int(state["step"]) == 4  # the step counts ...
  assert_trees_equal(state["params"], after_three_clean_steps["params"])  # ... its update does not
  assert_trees_equal(state["opt_state"], after_three_clean_steps["opt_state"])
  history = t.train()
  assert [r["nan_steps"] for r in history] == [1, 1] and all(np.isfinite(r["loss"]) for r in history)
  with open(tmp_path / "metrics.jsonl") as f:
    assert '"loss": null' in f.read().splitlines()[3]
  resumed = Trainer(load_config(None, {**BASE, "run.dir": str(tmp_path)}))
  assert resumed.restore() == 6 and resumed.counters.nan_steps == 1  # the count survives a restart


@pytest.mark.parametrize("every", [2, 0], ids=["to-checkpoint", "to-initial-state"])
def test_rollback_reloads_and_leaves_the_batch_out(tmp_path, without_batch_2, every, capsys):
  # log_every 5: step 3's flag is read one step late, after step 4 already ran on the device.
  t = trainer(tmp_path, bad=lambda i: i == 2, **{"train.on_nan": "rollback", "train.log_every": 5,
                                                "checkpoint.every": every})
  history = t.train()
  back = 2 if every else 0
  assert f"step 3: non-finite loss or gradients; rolled back to step {back}, leaving out batch 2" in capsys.readouterr().err
  reference_history, reference_state = without_batch_2
  assert_trees_equal(t.state["params"], reference_state["params"])
  assert_trees_equal(t.state["opt_state"], reference_state["opt_state"])
  assert [r["step"] for r in history] == [1, 5, 6]
  assert [r["loss"] for r in history] == [reference_history[i]["loss"] for i in (0, 4, 5)]
  assert history[-1]["nan_steps"] == 1 and t.counters.skipped_batches == {2}


def test_stop_saves_the_batch_and_a_checkpoint(tmp_path):
  t = trainer(tmp_path, bad=lambda i: i == 3, **{"train.on_nan": "stop", "train.log_every": 100,
                                                "checkpoint.every": 0})
  with pytest.raises(NonFiniteError) as info:
    t.train()
  assert info.value.step == 4
  message = str(info.value)
  assert "non-finite loss or gradients at step 4 (train.on_nan=stop)" in message and "\n" not in message
  batch = np.load(tmp_path / "nonfinite" / "step_4.npy")
  assert batch.shape == (8, 33) and batch.min() >= VOCAB
  # Step 4's flag was read after step 5 ran: the checkpoint holds step 5, without step 4's update.
  assert "checkpoint 5 holds the state without the non-finite updates" in message
  resumed = Trainer(load_config(None, {**BASE, "run.dir": str(tmp_path)}))
  assert resumed.restore() == 5 and resumed.counters.nan_steps == 1
  assert all(np.isfinite(x).all() for x in host(resumed.state["params"]))


@pytest.mark.parametrize("policy,message", [
    ("skip", "non-finite loss or gradients at step 5 (3 non-finite steps in a row, train.nan_limit=3)"),
    ("rollback", "non-finite loss or gradients at step 3 (3 non-finite steps since the last checkpoint"),
])
def test_nan_limit_stops_a_diverged_run(tmp_path, policy, message):
  t = trainer(tmp_path, bad=lambda i: i >= 2, **{"train.on_nan": policy, "train.nan_limit": 3, "train.steps": 10})
  with pytest.raises(NonFiniteError, match=re.escape(message)):
    t.train()
  assert t.counters.nan_steps == 3


def test_cli_stop_on_a_diverging_run_exits_3(tmp_path, repo_root, capsys):
  # No hook at all: a learning rate of 1e30 blows the weights up at step 1, the loss at step 2.
  args = [f"{k}={v}" for k, v in BASE.items()] + [
      f"run.dir={tmp_path}", "train.lr=1e30", "train.warmup_steps=0", "train.on_nan=stop"]
  code = cli.main(["train", os.path.join(repo_root, "configs", "tiny.yaml"), *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 3
  assert err[-1].startswith("paxlite: error: non-finite loss or gradients at step 2 (train.on_nan=stop)")
  assert os.path.isfile(tmp_path / "nonfinite" / "step_2.npy")
