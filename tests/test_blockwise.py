"""Blockwise attention equals XLA's attention (values and gradients, float32), keeps only
flash attention's residuals, and trains with the same losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlite.config import load_config
from paxlite.models.blockwise import SAVE_NAME, blockwise_attention
from paxlite.models.transformer import _REMAT_POLICIES


def _inputs(t, n, k, h=16, b=2):
  rng = np.random.default_rng(0)
  draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return draw(b, t, n, h), draw(b, t, k, h), draw(b, t, k, h), draw(b, t, n, h)


@pytest.mark.parametrize("t,n,k,block", [(96, 4, 2, 32), (30, 2, 1, 8)])  # GQA; blocks not dividing t
def test_blockwise_equals_xla_attention_and_its_gradients(t, n, k, block):
  q, kk, v, w = _inputs(t, n, k)
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  ours = lambda q, k, v: blockwise_attention(q, k, v, block)
  np.testing.assert_allclose(jax.jit(ours)(q, kk, v), reference(q, kk, v), atol=2e-6)
  value_and_grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))
  for mine, theirs in zip(value_and_grads(ours)(q, kk, v), value_and_grads(reference)(q, kk, v)):
    np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_remat_keeps_output_and_log_sum_exp_only():
  q, kk, v, _ = _inputs(64, 4, 2)
  f = jax.checkpoint(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, 16)),
                     policy=_REMAT_POLICIES["dots_attention_saveable"])
  jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(f, *a))(q, kk, v)
  names = [e.params.get("name") for e in jaxpr.eqns if e.primitive.name == "name"]
  assert names.count(SAVE_NAME) == 2  # output and log-sum-exp, named for the policy
  # Nothing of size length x length is kept: the largest residual is q-sized.
  residuals = jaxpr.jaxpr.outvars[1:]
  assert max(np.prod(r.aval.shape) for r in residuals if hasattr(r, "aval")) <= q.size


def test_training_with_blockwise_attention_gives_xla_losses(tmp_path):
  from paxlite.trainer import Trainer

  base = {"model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2, "model.d_ff": 128, "model.seq_len": 32,
          "precision.compute": "float32", "train.steps": 2, "train.log_every": 1, "eval.every": 0,
          "checkpoint.every": 0, "data.source": "synthetic", "mesh.data": 2, "mesh.tensor": 2, "mesh.fsdp": 2,
          "run.tensorboard": False}
  losses = {}
  for attention in ("xla", "blockwise"):
    cfg = load_config(None, {**base, "model.attention": attention, "run.dir": str(tmp_path / attention)})
    losses[attention] = [r["loss"] for r in Trainer(cfg).train()]
  np.testing.assert_allclose(losses["blockwise"], losses["xla"], rtol=1e-5)
