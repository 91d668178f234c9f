"""Building blocks with logical axis names: parameters, dense projections, embeddings, RMSNorm.

Every parameter is created through `param`, which records its logical names as NNX
`out_sharding` metadata; the rules table (paxlite.partitioning) turns those names into
shardings. Layers keep parameters in `param_dtype` and compute in `compute_dtype`.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from paxlite.models import norm_kernels
from paxlite.numerics import Fp8Recipe, fp8_einsum, new_fp8_state, split_equation
from paxlite.partitioning import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
# checkpoint_name of a projection's operands in compute dtype (the normed activations, the
# SwiGLU product, the weights cast from param dtype): the forward pass materialises them for
# the matmul anyway, so a remat policy can keep them at no extra memory traffic.
MATMUL_INPUTS = "matmul_inputs"
# checkpoint_name of what RMSNorm's backward pass reads (its input and 1/rms per token): a
# remat policy that keeps them spares the backward pass re-adding the residual stream and
# re-reducing it for the statistics.
NORM_RESIDUALS = "norm_residuals"


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str], dtype) -> nnx.Param:
  """A parameter whose dimensions carry the logical names `names`."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), dtype))


def scaled_normal(std: float, fan_in: int | None = None) -> Initializer:
  """Normal(0, std), or Normal(0, 1/sqrt(fan_in)) when fan_in is given (for multi-axis inputs)."""
  scale = std if fan_in is None else fan_in ** -0.5
  return nnx.initializers.normal(stddev=scale)


class Einsum(nnx.Module):
  """A weight applied with one einsum, e.g. 'btd,dnh->btnh' for a query projection.

  The contraction runs in compute dtype with float32 accumulation on GPU/TPU matrix units,
  or, given an fp8 recipe, in fp8 (paxlite.numerics.fp8_einsum); delayed scaling keeps the
  amax history of its input, kernel and output gradient in `fp8_history` and reports this
  step's amaxes through the gradient of `fp8_seen`.
  """

  def __init__(self, equation: str, shape: Sequence[int], names: Sequence[str], *, init: Initializer,
               param_dtype, compute_dtype, rngs: nnx.Rngs, fp8: Fp8Recipe | None = None):
    self.equation = equation
    self.compute_dtype = compute_dtype
    self.fp8 = fp8
    self.kernel = param(rngs, init, shape, names, param_dtype)
    if fp8 is not None:
      split_equation(equation)  # fails now, not at trace time, if its gradients are not einsums
      if fp8.mode == "delayed":
        self.fp8_history, self.fp8_seen = new_fp8_state(fp8.history)

  def input_history(self) -> jax.Array | None:
    """The amax history row of this projection's input (delayed fp8), else None: passed to
    the projections that read the same input, so that all quantise it with one scale."""
    if self.fp8 is None or self.fp8.mode != "delayed":
      return None
    return self.fp8_history[...][0]

  def __call__(self, x: jax.Array, input_history: jax.Array | None = None) -> jax.Array:
    x, kernel = x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype)
    if self.fp8 is None:
      return jnp.einsum(self.equation, checkpoint_name(x, MATMUL_INPUTS), checkpoint_name(kernel, MATMUL_INPUTS))
    if self.fp8.mode == "delayed":
      return fp8_einsum(self.equation, x, kernel, self.fp8_history[...], self.fp8_seen[...], input_history)
    return fp8_einsum(self.equation, x, kernel)


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` reuses it as a tied output head."""

  def __init__(self, vocab_size: int, d_model: int, *, std: float, param_dtype, compute_dtype, rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    self.embedding = param(rngs, scaled_normal(std), (vocab_size, d_model), ("vocab", "embed"), param_dtype)

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    # Gather the fsdp shards of the table first (ZeRO-3 all-gather before use): XLA's SPMD
    # partitioner cannot turn an fsdp-sharded gather into a batch-sharded output efficiently.
    table_vd = constrain(self.embedding[...], ("vocab", None))
    return jnp.take(table_vd, tokens_bt, axis=0).astype(self.compute_dtype)

  def attend(self, x_btd: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x_btd, self.embedding[...].astype(self.compute_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale, statistics in float32, output in x's dtype."""
  return norm_kernels.add_rms_norm_fwd_xla(x, None, scale, eps)[1]


def _rms_norm_fwd(x, scale, eps):
  _, y, inv_rms = norm_kernels.add_rms_norm_fwd_xla(x, None, scale, eps)
  # Only x (compute dtype) and one float32 scalar per token are kept for the backward pass;
  # plain autodiff would keep several float32 copies of x per norm (24 layers x 2 norms x
  # 4 bytes x batch x length x d_model: gigabytes of memory traffic per step at 1.7B).
  return y, (checkpoint_name(x, NORM_RESIDUALS), checkpoint_name(inv_rms, NORM_RESIDUALS), scale)


def _rms_norm_bwd(eps, residuals, dy):
  x, inv_rms, scale = residuals
  dx, d_scale = norm_kernels.rms_norm_bwd_xla((dy,), x, inv_rms, scale, None)
  return dx, d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def add_rms_norm(residual: jax.Array, delta: jax.Array | None, scale: jax.Array, eps: float,
                 kernel: str = "xla", copies: int = 1) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """(x, (y,) * copies) for the residual stream x = residual + delta (delta None: x is
  residual) and y = rms_norm(x, scale): the add, the norm and, in the backward pass, the
  stream's gradient plus the norm's, each in one pass (paxlite.models.norm_kernels; `kernel`
  "pallas" or "xla"). Give each consumer of y its own copy (the same array): their gradients
  then reach the backward pass apart, and it sums them in its own pass."""
  if delta is None:
    x, *ys = _norm_on_stream(residual, scale, eps, kernel, copies)
  else:
    x, *ys = _add_norm_on_stream(residual, delta, scale, eps, kernel, copies)
  return x, tuple(ys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _norm_on_stream(x, scale, eps, kernel, copies):
  return _norm_on_stream_fwd(x, scale, eps, kernel, copies)[0]


def _norm_on_stream_fwd(x, scale, eps, kernel, copies):
  return _add_norm_on_stream_fwd(x, None, scale, eps, kernel, copies)


def _norm_on_stream_bwd(eps, kernel, copies, residuals, cotangents):
  x, inv_rms, scale = residuals
  d_stream, *dys = cotangents
  dx, d_scale = norm_kernels.rms_norm_bwd(tuple(dys), x, inv_rms, scale, d_stream, kernel)
  return dx, d_scale.astype(scale.dtype)


_norm_on_stream.defvjp(_norm_on_stream_fwd, _norm_on_stream_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _add_norm_on_stream(residual, delta, scale, eps, kernel, copies):
  return _add_norm_on_stream_fwd(residual, delta, scale, eps, kernel, copies)[0]


def _add_norm_on_stream_fwd(residual, delta, scale, eps, kernel, copies):
  x, y, inv_rms = norm_kernels.add_rms_norm_fwd(residual, delta, scale, eps, kernel)
  return (x,) + (y,) * copies, (checkpoint_name(x, NORM_RESIDUALS), checkpoint_name(inv_rms, NORM_RESIDUALS), scale)


def _add_norm_on_stream_bwd(eps, kernel, copies, residuals, cotangents):
  dx, d_scale = _norm_on_stream_bwd(eps, kernel, copies, residuals, cotangents)
  return dx, dx, d_scale  # residual and delta are summed: both get the stream's gradient


_add_norm_on_stream.defvjp(_add_norm_on_stream_fwd, _add_norm_on_stream_bwd)


class RMSNorm(nnx.Module):
  """Root-mean-square norm (float32 statistics), learned scale initialised to 1. `kernel`:
  "pallas" runs `add_and_norm` through the fused kernels where they fit, "xla" never."""

  def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype, rngs: nnx.Rngs, kernel: str = "xla"):
    self.eps = eps
    self.compute_dtype = compute_dtype
    self.kernel = kernel
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x.astype(self.compute_dtype), self.scale[...], self.eps)

  def add_and_norm(self, residual: jax.Array, delta: jax.Array | None,
                   copies: int = 1) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """(x, (normed x,) * copies) for the residual stream x = residual + delta, a copy for each
    consumer of the normed x (see `add_rms_norm`)."""
    delta = None if delta is None else delta.astype(self.compute_dtype)
    return add_rms_norm(residual.astype(self.compute_dtype), delta, self.scale[...], self.eps, self.kernel, copies)


def rotary(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, half-split layout (pairs (i, i + h/2)), as in Llama/HF.

  Angles are computed in float32; the rotation itself runs in x's dtype (as HF does), so a
  bf16 model does not keep float32 copies of q and k alive for the backward pass.
  """
  head_dim = x_btnh.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [b, t, h/2]
  sin = jnp.sin(angles)[:, :, None, :].astype(x_btnh.dtype)
  cos = jnp.cos(angles)[:, :, None, :].astype(x_btnh.dtype)
  x1, x2 = jnp.split(x_btnh, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
