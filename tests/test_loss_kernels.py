"""The loss's Pallas kernel (run by Pallas's interpreter on CPU): it computes jax.nn's logsumexp
and the targets' logits, and the model trains to the same losses with it as with XLA's
fusions, each device on its own rows; where the vocabulary is split, XLA's fusions run."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlite import loss_kernels
from paxlite.config import ConfigError, load_config
from paxlite.mesh import make_mesh
from paxlite.loss import cross_entropy
from paxlite.trainer import Trainer


@pytest.fixture
def interpret(monkeypatch):
  monkeypatch.setattr(loss_kernels, "INTERPRET", True)


@pytest.mark.parametrize("dtype,rows,chunk", [(jnp.float32, 2, 256), (jnp.bfloat16, 4, 128), (jnp.float32, 1, 1024)])
def test_kernel_computes_logsumexp_and_the_targets_logits(dtype, rows, chunk, interpret):
  """A vocabulary that no chunk size divides; rows of -inf, of +inf and half -inf."""
  x = 30.0 * jax.random.normal(jax.random.key(1), (16, 1000), jnp.float32)
  x = x.at[0].set(-jnp.inf).at[1, 7].set(jnp.inf).at[2, :500].set(-jnp.inf).astype(dtype)
  targets = jax.random.randint(jax.random.key(2), (16,), 0, 1000).at[2].set(999)
  log_z, target_logit = loss_kernels.log_z_and_target_logit_pallas(x, targets, rows=rows, chunk=chunk)
  x32 = x.astype(jnp.float32)
  np.testing.assert_allclose(log_z, jax.nn.logsumexp(x32, axis=-1), rtol=1e-6)
  np.testing.assert_array_equal(target_logit, jnp.take_along_axis(x32, targets[:, None], axis=-1)[:, 0])
  assert log_z.dtype == target_logit.dtype == jnp.float32


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_cross_entropy_and_its_gradient_are_the_same_with_either_kernel(z_loss, interpret):
  logits = 3.0 * jax.random.normal(jax.random.key(0), (4, 8, 300), jnp.float32)
  targets = jax.random.randint(jax.random.key(1), (4, 8), 0, 300)
  (xla, pallas) = (jax.jit(jax.value_and_grad(lambda l, k=k: cross_entropy(l, targets, z_loss, k)[1]))
                   for k in ("xla", "pallas"))
  (want_loss, want_grad), (loss, grad) = xla(logits), pallas(logits)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, atol=1e-7)
  assert "log_z_and_target_logit" in str(jax.make_jaxpr(lambda l: cross_entropy(l, targets, z_loss, "pallas"))(logits))


SMALL = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 16,
    "train.lr": 1e-2, "train.warmup_steps": 1, "train.steps": 2,
}


@pytest.mark.parametrize("mesh,calls", [
    ({"mesh.data": 2, "mesh.fsdp": 4}, 1),
    ({"mesh.data": 4, "mesh.tensor": 2}, 0),
    ({"mesh.stage": 2, "mesh.data": 4, "pipeline.microbatches": 2}, 1),
], ids=["data2_fsdp4", "data4_tensor2", "stage2_data4"])
def test_model_trains_the_same_with_either_kernel(mesh, calls, interpret):
  """float32: the same losses, gradient norms and parameters after two steps; the kernel runs
  per device under shard_map on data x fsdp and after a pipeline's stages, and not where
  tensor splits the vocabulary."""
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 16, (16, 33)).astype(np.int32) for _ in range(2)]
  results = {}
  for kernel in ("xla", "pallas"):
    cfg = load_config(None, {**SMALL, **mesh, "train.loss_kernel": kernel})
    trainer = Trainer(cfg, mesh=make_mesh(cfg.mesh))
    metrics = [trainer.step(b) for b in batches]
    with trainer.activate():
      jaxpr = str(jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), jax.ShapeDtypeStruct((16, 33), jnp.int32)))
    results[kernel] = ([float(m[key]) for m in metrics for key in ("loss", "grad_norm")],
                       jax.tree.leaves(jax.device_get(trainer.state["params"])),
                       len(re.findall(r"name=log_z_and_target_logit\b", jaxpr)))
  np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=1e-5)
  for p, x in zip(results["pallas"][1], results["xla"][1]):
    np.testing.assert_allclose(p, x, rtol=1e-4, atol=3e-5)  # as test_norm_kernels
  assert (results["xla"][2], results["pallas"][2]) == (0, calls)


def test_auto_is_pallas_on_gpus_only(monkeypatch):
  assert loss_kernels.implementation("xla") == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert loss_kernels.implementation("auto") == "pallas"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert loss_kernels.implementation("auto") == "xla"
  with pytest.raises(ConfigError, match=r"train.loss_kernel: pallas needs a GPU"):
    loss_kernels.implementation("pallas")
  with pytest.raises(ConfigError, match=r"train.loss_kernel"):
    load_config(None, {"train.loss_kernel": "triton"})


def test_falls_back_where_the_rows_do_not_tile(interpret, monkeypatch):
  names = ("batch", "length", "vocab")
  assert loss_kernels.row_axes("pallas", names, (1, 1, 100)) == ((), ())
  assert loss_kernels.row_axes("xla", names, (4, 32, 100)) is None
  monkeypatch.setattr(loss_kernels, "ROWS", 2)
  assert loss_kernels.row_axes("pallas", names, (4, 32, 100)) == ((), ())
  assert loss_kernels.row_axes("pallas", names, (1, 1, 100)) is None


def test_the_kernel_reads_the_heads_bf16_logits(interpret, monkeypatch):
  """Not a float32 copy of them: the model hands the loss its logits as computed."""
  seen = []
  traced = loss_kernels.log_z_and_target_logit_pallas
  monkeypatch.setattr(loss_kernels, "log_z_and_target_logit_pallas", lambda l, t: seen.append(l.dtype) or traced(l, t))
  cfg = load_config(None, {**SMALL, "mesh.data": 8, "precision.compute": "bfloat16", "train.loss_kernel": "pallas"})
  trainer = Trainer(cfg, mesh=make_mesh(cfg.mesh))
  with trainer.activate():
    jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), jax.ShapeDtypeStruct((16, 33), jnp.int32))
  assert seen == [jnp.bfloat16]
