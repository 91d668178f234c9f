"""The train state carried layer by layer, with the blocks' kernels in compute dtype
(precision.compute_copy, paxlite.step_state): it trains as the stacked state does, which
Trainer.state and checkpoints keep."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlite.config import load_config
from paxlite.mesh import make_mesh
from paxlite.trainer import Trainer

# Three layers: a leading 3 in a shape is a stack of layers (no other dimension is 3).
SMALL = {
    "model.num_layers": 3, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "bfloat16", "model.scan_layers": False,
    "train.batch_size": 16, "train.lr": 1e-2, "train.warmup_steps": 1, "train.steps": 3, "data.source": "synthetic",
}
MESHES = {
    "1dev": {"mesh.data": 1},
    "d2f2t2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    "fsdp8_accum2": {"mesh.data": 1, "mesh.fsdp": 8, "train.grad_accum": 2},
}


def batches(n=3):
  rng = np.random.default_rng(0)
  return [rng.integers(0, 64, (16, 33)).astype(np.int32) for _ in range(n)]


def make_trainer(overrides, run_dir=None):
  cfg = load_config(None, {**SMALL, **overrides, **({"run.dir": str(run_dir)} if run_dir else {})})
  return Trainer(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:1] if cfg.mesh.data == 1 and cfg.mesh.fsdp == 1 else None))


@pytest.mark.parametrize("name", list(MESHES))
def test_one_step_is_the_stacked_states(name):
  """One step from the same initial state gives the stacked state's loss, gradient norm,
  parameters and Adam moments, to float32 rounding (float32 params, bf16 compute)."""
  stacked = make_trainer({**MESHES[name], "precision.compute_copy": False})
  layered = make_trainer(MESHES[name])
  assert stacked.step_layout is None and layered.step_layout is not None
  batch = batches(1)[0]
  want, got = stacked.step(batch), layered.step(batch)
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)
  # The norm's sums may be ordered differently across devices (tensor splits a leaf's squares).
  np.testing.assert_allclose(float(got["grad_norm"]), float(want["grad_norm"]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               jax.device_get(layered.state), jax.device_get(stacked.state))


def test_trains_as_the_stacked_state_and_resumes_from_its_checkpoints(tmp_path, assert_each_array_near):
  """The training loop with the layered state on data x fsdp x tensor, checkpointing every step
  (so the state is read out stacked between steps) and resumed after step 2 by a new Trainer,
  trains as the stacked state does.

  Within bf16's reach, not float32's: a float32 rounding difference in one step (see above)
  moves a parameter across a bf16 rounding boundary now and then, and the next step's matmuls
  then read the neighbouring bf16 value, and the gradients move by bf16's precision (~4e-3).
  By step 3 each array of the state is within ~6e-3 of its norm of the stacked run's, where a
  lost moment or a layer out of place would be off by about its whole norm."""
  run = {**MESHES["d2f2t2"], "train.log_every": 1, "eval.every": 0, "run.tensorboard": False}
  stacked = make_trainer({**run, "precision.compute_copy": False}, run_dir=tmp_path / "stacked")
  reference = stacked.train(steps=3)

  layered = make_trainer({**run, "checkpoint.every": 1}, run_dir=tmp_path / "layered")
  history = layered.train(steps=2)
  resumed = make_trainer({**run, "checkpoint.every": 1}, run_dir=tmp_path / "layered")
  history += resumed.train(steps=3)

  assert [r["step"] for r in history] == [1, 2, 3]
  for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-3)):
    np.testing.assert_allclose([r[key] for r in history], [r[key] for r in reference], rtol=rtol)
  assert_each_array_near(resumed.state, stacked.state, 3e-2)


def test_state_reads_stacked_and_the_step_carries_layers_and_their_casts():
  trainer = make_trainer(MESHES["d2f2t2"])
  for b in batches(2):
    trainer.step(b)
  carried = trainer._step_form
  up = carried["params"]["blocks"]["mlp"]["up"]["kernel"]
  assert isinstance(up, list) and len(up) == 3 and up[0].shape == (64, 128) and up[0].dtype == jnp.float32
  # Adam's moments are carried layer by layer too, laid out as their layers.
  mu = carried["opt_state"][1][0].mu["blocks"]["mlp"]["up"]["kernel"]
  assert len(mu) == 3 and mu[0].sharding == up[0].sharding
  # One compute-dtype copy per layer of each of the 7 kernels (norm scales are not cast).
  copies = carried["compute_copy"]
  assert len(copies) == 7 and all(len(c) == 3 and c[0].dtype == jnp.bfloat16 for c in copies)
  want = [[np.asarray(p.astype(jnp.bfloat16)) for p in layers]
          for layers in trainer.step_layout.copied_layers(carried["params"])]
  jax.tree.map(lambda c, w: np.testing.assert_array_equal(np.asarray(c), w), [list(c) for c in copies], want)

  # Read between steps, the state is stacked and laid out as checkpoints hold it...
  params = jax.device_get(carried["params"])
  state = trainer.state
  assert trainer._step_form is None
  assert state["params"]["blocks"]["mlp"]["up"]["kernel"].shape == (3, 64, 128)
  jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"), state, trainer.state_shardings)
  np.testing.assert_array_equal(np.asarray(state["params"]["blocks"]["mlp"]["up"]["kernel"][1]),
                                params["blocks"]["mlp"]["up"]["kernel"][1])
  # ...and the next step takes it back.
  before = jax.device_get(state)
  again = trainer.step_state(jax.device_put(before, trainer.state_shardings))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer._to_public(again)), before)
  assert np.isfinite(float(trainer.step(batches(1)[0])["loss"]))


def test_the_layers_are_neither_stacked_nor_copied_in_the_compiled_step():
  """The model gets each kernel's layers stacked, and splits them again: XLA folds the two,
  so the compiled step concatenates, slices or copies no [layers, ...] array, where the
  stacked state's step concatenates every layer's gradients and slices its parameters."""

  def stacks(compute_copy):
    trainer = make_trainer({"precision.compute_copy": compute_copy, "mesh.data": 1})
    hlo = trainer.compile_step()[0].as_text()
    return len(re.findall(r"= \w+\[3,\d+[\d,]*\]\S* (?:concatenate|slice|copy)\(", hlo))

  assert stacks(False) > 0
  assert stacks(True) == 0


@pytest.mark.parametrize("overrides", [
    {"precision.compute_copy": False}, {"model.scan_layers": True}, {"precision.compute": "float32"},
    {"model.num_layers": 4, "mesh.stage": 2, "mesh.data": 4, "pipeline.microbatches": 2},
], ids=["off", "scan", "float32", "pipeline"])
def test_carried_only_where_it_saves_a_cast(overrides):
  assert make_trainer(overrides).step_layout is None


def test_not_carried_for_a_custom_model():
  """A custom model casts its own parameters: the step hands it them as stored."""
  from paxlite.models.build import default_model_fn

  cfg = load_config(None, SMALL)
  assert Trainer(cfg, model_fn=default_model_fn(cfg)).step_layout is None
