"""The backbone: every mesh layout gives the single-device numbers (float32)."""

import jax
import numpy as np
import pytest

from paxlite.config import load_config
from paxlite.mesh import make_mesh
from paxlite.partitioning import resolve
from paxlite.trainer import Trainer

SMALL = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 16,
    "train.lr": 1e-2, "train.warmup_steps": 1, "train.steps": 3,
}
MESHES = {
    "1dev": {"mesh.data": 1},
    "data8": {"mesh.data": 8},
    "fsdp8": {"mesh.data": 1, "mesh.fsdp": 8},
    "d2f2t2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
}


def batches(n=3, batch=16, seq=32, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 16, (batch, seq + 1)).astype(np.int32) for _ in range(n)]


def make_trainer(overrides, devices=None):
  cfg = load_config(None, {**SMALL, **overrides})
  return Trainer(cfg, mesh=make_mesh(cfg.mesh, devices))


@pytest.fixture(scope="module")
def mesh_runs():
  out = {}
  for name, mesh in MESHES.items():
    trainer = make_trainer(mesh, jax.devices()[:1] if name == "1dev" else None)
    metrics = [trainer.step(b) for b in batches()]
    out[name] = (trainer, [float(m["loss"]) for m in metrics], [float(m["grad_norm"]) for m in metrics])
  return out


@pytest.mark.parametrize("name", [n for n in MESHES if n != "1dev"])
def test_losses_and_grads_equal_single_device(mesh_runs, name):
  _, ref_loss, ref_gn = mesh_runs["1dev"]
  trainer, loss, gn = mesh_runs[name]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(gn, ref_gn, rtol=1e-5)
  assert loss[-1] < loss[0]  # and they train
  ref_params = jax.device_get(mesh_runs["1dev"][0].state["params"])
  params = jax.device_get(trainer.state["params"])
  # Adam divides by sqrt(v): a gradient near zero turns float32 rounding into up to ~1e-3 of
  # an lr step (lr 1e-2 here), hence the absolute tolerance on the parameters themselves.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5), params, ref_params)


@pytest.mark.parametrize("name", list(MESHES))
def test_parameter_shardings_follow_the_rules(mesh_runs, name):
  trainer = mesh_runs[name][0]
  mesh_shape = dict(trainer.mesh.shape)
  state = trainer.state
  q = state["params"]["blocks"]["attn"]["q"]["kernel"]
  expected = resolve(("layers", "embed", "heads", "head_dim"), trainer.rules, shape=q.shape, mesh_shape=mesh_shape)
  assert q.sharding.spec == expected
  layers, d, n, h = q.shape
  local = q.addressable_shards[0].data.shape
  assert local == (layers, d // mesh_shape["fsdp"], n // mesh_shape["tensor"], h)
  down = state["params"]["blocks"]["mlp"]["down"]["kernel"]
  assert down.addressable_shards[0].data.shape == (2, 128 // mesh_shape["tensor"], 64 // mesh_shape["fsdp"])
  # Adam moments are sharded exactly like their parameters (ZeRO).
  mu = jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, dict) and "blocks" in x)
  moments = [m for m in mu if isinstance(m, dict)]
  assert moments and all(m["blocks"]["attn"]["q"]["kernel"].sharding.spec == expected for m in moments)


def test_grad_accum_equals_one_large_batch():
  big = batches(n=2, batch=16)
  one = make_trainer({"train.grad_accum": 1, "mesh.data": 4, "mesh.fsdp": 2})
  four = make_trainer({"train.grad_accum": 4, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  l1 = [float(one.step(b)["loss"]) for b in big]
  l4 = [float(four.step(b)["loss"]) for b in big]
  np.testing.assert_allclose(l4, l1, rtol=1e-5)


def test_unrolled_layers_match_scan(mesh_runs):
  trainer = make_trainer({"mesh.data": 8, "model.scan_layers": False, "model.remat": "full"})
  loss = [float(trainer.step(b)["loss"]) for b in batches()]
  np.testing.assert_allclose(loss, mesh_runs["1dev"][1], rtol=1e-5)


def test_unrolled_layers_gradients_are_one_concatenation_per_stacked_array():
  """With the state stacked (precision.compute_copy off; tests/test_step_state.py has it on):
  each stacked parameter's gradient is one concatenation of its layers' gradients, not a
  sum of zero-padded per-layer arrays (what slicing each layer out would give); each layer's
  kernels are cast after the split, so their gradients are converted before it; the gradient
  norm (clipping's and the metric's) sums the stacked gradients layer by layer."""
  import re

  import jax.numpy as jnp

  trainer = make_trainer({"model.scan_layers": False, "precision.compute": "bfloat16",
                          "precision.compute_copy": False}, jax.devices()[:1])
  batch = jax.ShapeDtypeStruct((16, 33), jnp.int32)
  with trainer.activate():
    jaxpr = str(jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), batch))
  assert " pad[" not in jaxpr
  stacked = len(jax.tree.leaves(trainer.param_shapes["blocks"]))
  assert jaxpr.count("split[axis=0 sizes=(1, 1)]") == 3 * stacked  # SMALL has 2 layers
  assert jaxpr.count("concatenate[dimension=0]") >= stacked
  # Every stacked gradient, the 7 kernels' included, is concatenated in float32.
  assert len(re.findall(r"f32\[2,[0-9,]+\] = concatenate\[dimension=0\]", jaxpr)) == stacked
  assert sum(jax.tree.leaves(trainer.per_layer)) == stacked
  # A scan stacks its gradients in place: no concatenation, no per-layer sums.
  assert not any(jax.tree.leaves(make_trainer({"precision.compute": "bfloat16"}, jax.devices()[:1]).per_layer))


def test_tied_embeddings_and_z_loss_train():
  trainer = make_trainer({"mesh.data": 8, "model.tie_embeddings": True, "train.z_loss": 1e-4})
  assert "head" not in trainer.param_shapes
  loss = [float(trainer.step(b)["loss"]) for b in batches(n=3)]
  assert loss[-1] < loss[0]


def test_lr_schedule_warmup_then_cosine():
  from paxlite.optimizer import lr_schedule

  cfg = load_config(None, {"train.lr": 1.0, "train.warmup_steps": 10, "train.steps": 110, "train.min_lr_ratio": 0.1})
  sched = lr_schedule(cfg)
  assert float(sched(0)) == pytest.approx(0.1)
  assert float(sched(9)) == pytest.approx(1.0)
  assert float(sched(60)) == pytest.approx(0.55, rel=1e-5)
  assert float(sched(110)) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_embedding():
  from paxlite.optimizer import make_optimizer

  trainer = make_trainer({"mesh.data": 8})
  names = trainer.logical_names
  assert names["embed"]["embedding"] == ("vocab", "embed")
  assert names["blocks"]["attn_norm"]["scale"] == ("layers", "norm")
  cfg = load_config(None, {**SMALL, "train.weight_decay": 0.5, "train.lr": 1e-9})
  tx = make_optimizer(cfg, names)
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32), trainer.param_shapes)
  grads = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(np.abs(updates["final_norm"]["scale"]).max()) == 0.0
  assert float(np.abs(updates["blocks"]["attn_norm"]["scale"]).max()) == 0.0  # stacked, still a vector each
  assert float(np.abs(updates["embed"]["embedding"]).max()) == 0.0
  assert float(np.abs(updates["head"]["kernel"]).max()) > 0.0


def test_global_norm_summed_by_layer_is_optaxs():
  import optax

  from paxlite.optimizer import clip_by_global_norm, global_norm

  k1, k2 = jax.random.split(jax.random.key(0))
  grads = {"stacked": jax.random.normal(k1, (3, 4, 5)), "flat": jax.random.normal(k2, (7,))}
  per_layer = {"stacked": True, "flat": False}
  np.testing.assert_allclose(global_norm(grads, per_layer), optax.tree.norm(grads), rtol=1e-6)
  ours, theirs = clip_by_global_norm(1.0, per_layer), optax.clip_by_global_norm(1.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               ours.update(grads, ours.init(grads))[0], theirs.update(grads, theirs.init(grads))[0])


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_cross_entropy_gradient_is_autodiffs_in_one_pass(z_loss):
  """The hand-written gradient of the cross-entropy equals autodiff's of the plain formula
  (float32, and vocabulary-sharded over 8 devices), comes out in the logits' dtype, and scatters
  nothing into a [batch, length, vocab] array."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from paxlite.loss import cross_entropy

  def plain(logits, targets):
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    nll = jnp.mean(log_z - jnp.take_along_axis(logits.astype(jnp.float32), targets[..., None], axis=-1)[..., 0])
    return nll + z_loss * jnp.mean(jnp.square(log_z))

  k1, k2 = jax.random.split(jax.random.key(0))
  logits = 3.0 * jax.random.normal(k1, (4, 8, 64), jnp.float32)
  targets = jax.random.randint(k2, (4, 8), 0, 64)
  ours = jax.value_and_grad(lambda l: cross_entropy(l, targets, z_loss)[1])
  want_loss, want_grad = jax.value_and_grad(plain)(logits, targets)
  loss, grad = ours(logits)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, atol=1e-7)

  mesh = jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(logits, NamedSharding(mesh, P(None, None, "tensor")))
  loss, grad = jax.jit(ours)(sharded)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, atol=1e-7)

  assert ours(logits.astype(jnp.bfloat16))[1].dtype == jnp.bfloat16
  assert "scatter" not in jax.jit(jax.grad(lambda l: cross_entropy(l, targets, z_loss)[1])).lower(logits).as_text()
