"""The fused residual-add + RMSNorm kernels: the Pallas kernels (run by Pallas's interpreter on
CPU) compute what their plain-jnp twin computes, their gradients are autodiff's of the plain
formula, and the model trains to the same losses with either, on a sharded mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlite.config import ConfigError, load_config
from paxlite.mesh import make_mesh
from paxlite.models import norm_kernels
from paxlite.models.layers import add_rms_norm
from paxlite.trainer import Trainer

EPS = 1e-5


@pytest.fixture
def interpret(monkeypatch):
  monkeypatch.setattr(norm_kernels, "INTERPRET", True)


def arrays(n, rows=256, dim=128):
  keys = jax.random.split(jax.random.key(0), n + 1)
  acts = [jax.random.normal(k, (rows, dim), jnp.float32) for k in keys[:n]]
  return acts, 1 + 0.1 * jax.random.normal(keys[n], (dim,), jnp.float32)


@pytest.mark.parametrize("with_delta", [True, False])
def test_kernels_compute_what_the_jnp_twin_computes(with_delta):
  (residual, delta, dy, stream), scale = arrays(4)
  delta = delta if with_delta else None
  expected = norm_kernels.add_rms_norm_fwd_xla(residual, delta, scale, EPS)
  got = norm_kernels.add_rms_norm_fwd_pallas(residual, delta, scale, EPS, interpret=True)
  for e, g in zip(expected, got):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
  x, _, inv_rms = expected
  for d_stream, dys in ((stream, (dy,)), (None, (dy,)), (stream, (dy, stream, residual))):
    expected = norm_kernels.rms_norm_bwd_xla(dys, x, inv_rms, scale, d_stream)
    got = norm_kernels.rms_norm_bwd_pallas(dys, x, inv_rms, scale, d_stream, interpret=True)
    for e, g in zip(expected, got):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_add_rms_norm_gradients_are_autodiffs_of_the_formula(kernel, interpret):
  """Every output (the stream, and each copy of the normed stream) carries gradient; with
  [batch, length, d] inputs and no mesh."""
  (residual, delta, weights_x, weights_y), scale = arrays(4)
  shape = (2, 128, 128)
  residual, delta, weights_x, weights_y = (a.reshape(shape) for a in (residual, delta, weights_x, weights_y))

  def plain(r, d, s):
    x = r + d
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * s
    return jnp.sum(jnp.sin(x) * weights_x) + jnp.sum(y * weights_y) + jnp.sum(jnp.cos(y))

  def fused(r, d, s):
    x, (y, y_again) = add_rms_norm(r, d, s, EPS, kernel, copies=2)
    return jnp.sum(jnp.sin(x) * weights_x) + jnp.sum(y * weights_y) + jnp.sum(jnp.cos(y_again))

  expected = jax.grad(plain, argnums=(0, 1, 2))(residual, delta, scale)
  got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(residual, delta, scale)
  for e, g in zip(expected, got):
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5)
  if kernel == "pallas":
    jaxpr = str(jax.make_jaxpr(jax.grad(fused))(residual, delta, scale))
    assert set(re.findall(r"name=(add_rms_norm_fwd|rms_norm_bwd)", jaxpr)) == {"add_rms_norm_fwd", "rms_norm_bwd"}


SMALL = {
    "model.num_layers": 2, "model.d_model": 128, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 16,
    "train.lr": 1e-2, "train.warmup_steps": 1, "train.steps": 2,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.remat": "operands_saveable",
}


@pytest.mark.parametrize("scan", [True, False])
def test_model_trains_the_same_with_either_kernel(scan, interpret):
  """float32 on data x fsdp x tensor (the kernels run per device under shard_map, the scale's
  gradient summed over the batch shards): the same losses, gradient norms and parameters
  after two steps."""
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 16, (16, 33)).astype(np.int32) for _ in range(2)]
  results = {}
  for kernel in ("xla", "pallas"):
    cfg = load_config(None, {**SMALL, "model.scan_layers": scan, "model.norm_kernel": kernel})
    trainer = Trainer(cfg, mesh=make_mesh(cfg.mesh))
    metrics = [trainer.step(b) for b in batches]
    losses = [float(m[key]) for m in metrics for key in ("loss", "grad_norm")]
    with trainer.activate():
      jaxpr = str(jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), jax.ShapeDtypeStruct((16, 33), jnp.int32)))
    calls = len(re.findall(r"name=(?:add_rms_norm_fwd|rms_norm_bwd)\b", jaxpr))
    results[kernel] = losses, jax.tree.leaves(jax.device_get(trainer.state["params"])), calls
  np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=1e-5)  # as test_train
  for p, x in zip(results["pallas"][1], results["xla"][1]):
    # As in test_train: Adam turns float32 rounding in a near-zero gradient into ~1e-3 of a step.
    np.testing.assert_allclose(p, x, rtol=1e-4, atol=3e-5)
  assert results["xla"][2] == 0
  # Each norm once forward and once backward: 2 per block and the final norm, in one traced
  # scan body or per unrolled layer.
  assert results["pallas"][2] == 2 * (3 if scan else 2 * 2 + 1)


def test_each_consumers_gradient_reaches_the_kernel_apart(interpret, monkeypatch):
  """q, k and v's input gradients reach the attention norm's backward kernel as three arrays,
  gate and up's as two: summed in its pass, not by XLA in a pass before it."""
  parts = []
  traced = norm_kernels.rms_norm_bwd_pallas
  monkeypatch.setattr(norm_kernels, "rms_norm_bwd_pallas", lambda dys, *a, **k: parts.append(len(dys)) or traced(dys, *a, **k))
  cfg = load_config(None, {**SMALL, "model.scan_layers": False, "model.norm_kernel": "pallas"})
  trainer = Trainer(cfg, mesh=make_mesh(cfg.mesh))
  with trainer.activate():
    jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), jax.ShapeDtypeStruct((16, 33), jnp.int32))
  assert sorted(parts) == [1, 2, 2, 3, 3]  # the final norm, 2 MLP norms, 2 attention norms


def test_falls_back_where_the_kernels_do_not_fit(interpret):
  assert norm_kernels.use_pallas("pallas", (4, 32, 128))
  assert not norm_kernels.use_pallas("pallas", (4, 32, 96))  # not a power of two wide
  assert not norm_kernels.use_pallas("pallas", (1, 1, 128))  # a decode step's rows
  assert not norm_kernels.use_pallas("xla", (4, 32, 128))


def test_pallas_needs_a_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("this backend runs the kernels")
  cfg = load_config(None, {**SMALL, "model.norm_kernel": "pallas", "mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1})
  with pytest.raises(ConfigError, match=r"model.norm_kernel: pallas needs a GPU"):
    Trainer(cfg, mesh=make_mesh(cfg.mesh))
  with pytest.raises(ConfigError, match=r"model.norm_kernel"):
    load_config(None, {"model.norm_kernel": "triton"})
