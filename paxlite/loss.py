"""The training loss: token cross-entropy in float32, with optional z-loss, and a gradient
written by hand as one elementwise pass over the logits (the logits' forward pass may be the
Pallas kernel of paxlite.loss_kernels)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from paxlite import loss_kernels
from paxlite.models.transformer import LOGITS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def log_z_and_target_logit(logits_btv: jax.Array, targets_bt: jax.Array, kernel: str = "xla") -> tuple[jax.Array, jax.Array]:
  """Per token, in float32: the log-partition logsumexp(logits) and the target token's logit.

  `kernel` "pallas": both from one Pallas kernel that reads the logits once
  (paxlite.loss_kernels), where it takes their layout; otherwise XLA's fusions (a max, then a
  sum over the logits, and a gather).

  The gradient is written by hand so that it is one elementwise pass over the logits,
  softmax * g_log_z + onehot(target) * g_target, in the logits' dtype. Autodiff of
  take_along_axis scatters into a float32 [batch, length, vocab] zero array instead, and XLA
  then writes float32 logit gradients three times before casting them for the head's GEMMs
  (~20 GB of traffic per step on the 1.7B model's 16k x 50k logits; benchmarks/RESULTS.md).
  """
  return _log_z_and_target_logit_fwd(logits_btv, targets_bt, kernel)[0]


def _log_z_and_target_logit_fwd(logits_btv, targets_bt, kernel):
  axes = loss_kernels.row_axes(kernel, LOGITS, logits_btv.shape)
  if axes is not None:
    log_z_bt, target_logit_bt = loss_kernels.log_z_and_target_logit(logits_btv, targets_bt, axes)
  else:
    logits32 = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits32, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits32, targets_bt[..., None], axis=-1)[..., 0]
  return (log_z_bt, target_logit_bt), (logits_btv, targets_bt, log_z_bt)


def _log_z_and_target_logit_bwd(kernel, residuals, cotangents):
  logits_btv, targets_bt, log_z_bt = residuals
  g_log_z_bt, g_target_bt = cotangents
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits_btv.shape, logits_btv.ndim - 1)
  softmax = jnp.exp(logits_btv.astype(jnp.float32) - log_z_bt[..., None])
  d_logits = softmax * g_log_z_bt[..., None] + jnp.where(vocab == targets_bt[..., None], g_target_bt[..., None], 0.0)
  return d_logits.astype(logits_btv.dtype), None


log_z_and_target_logit.defvjp(_log_z_and_target_logit_fwd, _log_z_and_target_logit_bwd)


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, z_loss: float,
                  kernel: str = "xla") -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy in float32, and the total loss including z-loss. `kernel`: the
  logits' pass, "pallas" or "xla" (see log_z_and_target_logit)."""
  log_z_bt, target_logit_bt = log_z_and_target_logit(logits_btv, targets_bt, kernel)
  nll = jnp.mean(log_z_bt - target_logit_bt)
  total = nll + z_loss * jnp.mean(jnp.square(log_z_bt)) if z_loss else nll
  return nll, total
