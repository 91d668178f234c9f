"""Residual add + RMSNorm in one pass over the activations: Pallas kernels for GPUs, and the
same arithmetic in plain jnp for every other backend (and as the kernels' reference).

Why kernels: XLA cannot fuse a row reduction with the elementwise work that needs its result,
so it runs a norm as two passes (the sum of squares, then the scaling) and its backward as
two or three (the per-token dot product, then dx and the column sum for the scale's
gradient), each reading the [tokens, d_model] activations again. Here one kernel per
direction reads each input once:
- forward: x = residual + delta, y = x / rms(x) * scale, 1/rms per token;
- backward: d_x = d_residual_stream + norm's dx (the residual stream's gradient and the norm's
  own, summed in the same pass), and per-program partial sums of the scale's gradient. The
  norm's output gradient comes in parts, one per consumer (q, k and v read the same normed
  x; gate and up too), summed in the same pass rather than by XLA before it.

Arithmetic is that of paxlite.models.layers.rms_norm (statistics in float32, outputs rounded
to the activations' dtype at the same points), so switching implementation changes no
result beyond float32 reassociation of the sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import PartitionSpec as P

from paxlite.config import ConfigError
from paxlite.partitioning import activation_split

# The activations' logical names, as the decoder constrains them between blocks.
_ACTIVATION = ("batch", "length", "act_embed")
# Tests set this to run the Pallas kernels through Pallas's interpreter (on CPU).
INTERPRET = False

# Block sizes and warps, from benchmarks/norm_kernels.py on an H200 at [16384, 2048] bf16
# (rounds 23-24): rows of [tokens, d_model] per forward program and per step of a backward
# program's loop, and rows per backward program (its partial sums of the scale's gradient are
# one row of a [tokens / _BWD_PROGRAM_ROWS, d_model] float32 array, summed after). Eight rows
# per step ran the backward at half the speed of four (register spills).
_FWD_ROWS = 2
_BWD_ROWS = 4
_BWD_PROGRAM_ROWS = 64
_NUM_WARPS = 4


def kernel_fits(rows: int, dim: int) -> bool:
  """Whether the Pallas kernels take [rows, dim] activations: Triton blocks need a
  power-of-two width, and the row blocks must tile the rows exactly."""
  return dim >= 128 and dim & (dim - 1) == 0 and dim <= 16384 and rows % _BWD_PROGRAM_ROWS == 0


def implementation(setting: str, key: str = "model.norm_kernel", interpret: bool | None = None) -> str:
  """A kernel setting (`key`: model.norm_kernel, train.loss_kernel) -> "pallas" | "xla": auto
  is pallas on GPU. Raises ConfigError for pallas on another backend (Pallas's Triton kernels
  are GPU code) unless the kernels run in Pallas's interpreter (`interpret`, default INTERPRET)."""
  if setting == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  interpret = INTERPRET if interpret is None else interpret
  if setting == "pallas" and jax.default_backend() != "gpu" and not interpret:
    raise ConfigError(f"{key}: pallas needs a GPU, this backend is {jax.default_backend()}; use auto or xla")
  return setting


def add_rms_norm_fwd(residual, delta, scale, eps: float, kernel: str):
  """(x, y, inv_rms) for [batch, length, d] activations: x = residual + delta (or residual
  when delta is None), y = rms_norm(x) * scale, inv_rms [batch, length] float32. `kernel`:
  "pallas" or "xla" (see `use_pallas`)."""
  row_axes = _kernel_row_axes(kernel, residual.shape)
  if row_axes is None:
    return add_rms_norm_fwd_xla(residual, delta, scale, eps)

  def local(r, s, *delta_or_none):
    b, t, d = r.shape
    flat = lambda a: a.reshape(b * t, d)
    x, y, inv = add_rms_norm_fwd_pallas(flat(r), flat(delta_or_none[0]) if delta_or_none else None, s, eps,
                                        interpret=INTERPRET)
    return x.reshape(b, t, d), y.reshape(b, t, d), inv.reshape(b, t)

  inputs = (residual, scale) + (() if delta is None else (delta,))
  if not any(row_axes):
    return local(*inputs)
  acts, rows = _row_specs(row_axes)
  in_specs = (acts, P(None)) + (() if delta is None else (acts,))
  return jax.shard_map(local, in_specs=in_specs, out_specs=(acts, acts, rows), check_vma=False)(*inputs)


def rms_norm_bwd(dys, x, inv_rms, scale, d_stream, kernel: str):
  """(d_x, d_scale) for [batch, length, d] activations: the norm's input gradient, given its
  output's gradients `dys` (one per consumer of the output, summed here in float32), plus the
  residual stream's gradient `d_stream` (None: nothing), and the scale's gradient (float32)."""
  row_axes = _kernel_row_axes(kernel, x.shape)
  if row_axes is None:
    return rms_norm_bwd_xla(dys, x, inv_rms, scale, d_stream)
  split_by = row_axes[0] + row_axes[1]  # the scale's gradient sums over the devices' rows

  def local(xx, inv, s, *gradients):
    b, t, d = xx.shape
    flat = lambda a: a.reshape(b * t, d)
    g, stream = (gradients, None) if d_stream is None else (gradients[:-1], flat(gradients[-1]))
    dx, d_scale = rms_norm_bwd_pallas(tuple(flat(a) for a in g), flat(xx), inv.reshape(b * t), s, stream,
                                      interpret=INTERPRET)
    return dx.reshape(b, t, d), jax.lax.psum(d_scale, split_by) if split_by else d_scale

  inputs = (x, inv_rms, scale, *dys) + (() if d_stream is None else (d_stream,))
  if not split_by:
    return local(*inputs)
  acts, rows = _row_specs(row_axes)
  in_specs = (acts, rows, P(None)) + (acts,) * (len(inputs) - 3)
  return jax.shard_map(local, in_specs=in_specs, out_specs=(acts, P(None)), check_vma=False)(*inputs)


def use_pallas(kernel: str, shape) -> bool:
  """Whether the kernels run for activations of `shape` [batch, length, d] (see
  `_kernel_row_axes`); otherwise the plain-jnp twin runs: same arithmetic, XLA's fusions."""
  return _kernel_row_axes(kernel, shape) is not None


def _kernel_row_axes(kernel: str, shape) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
  """The mesh axes that split the batch and the length dimensions of activations of `shape`
  [batch, length, d] (empty with no mesh), when the kernels take them; None when they do
  not: not asked for, d sharded (the statistics are per row), or each device's rows not
  tiling the kernels' blocks."""
  if kernel != "pallas":
    return None
  (batch, length, dim), ways = activation_split(_ACTIVATION, shape)
  if dim:
    return None
  rows = shape[0] // ways[0] * (shape[1] // ways[1])
  return (batch, length) if kernel_fits(rows, shape[2]) else None


def _row_specs(row_axes):
  """PartitionSpecs of [batch, length, d] activations and of [batch, length] statistics."""
  batch, length = (axes or None for axes in row_axes)
  return P(batch, length, None), P(batch, length)


# --- plain jnp (every backend; the reference the kernels are tested against) -------------


def add_rms_norm_fwd_xla(residual, delta, scale, eps):
  """(x, y, inv_rms) for x = residual + delta (delta may be None), over the last axis."""
  x = residual if delta is None else residual + delta
  x32 = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  y = (x32 * inv_rms * scale.astype(jnp.float32)).astype(x.dtype)
  return x, y, inv_rms[..., 0]


def rms_norm_bwd_xla(dys, x, inv_rms, scale, d_stream):
  """(d_x, d_scale): the norm's input gradient, given its output's gradients `dys` (summed in
  float32), plus `d_stream` (None: nothing), and the scale's gradient in float32."""
  inv_rms = inv_rms[..., None]
  x_hat = x.astype(jnp.float32) * inv_rms
  dy32 = sum(dy.astype(jnp.float32) for dy in dys)
  d_scale = jnp.sum(dy32 * x_hat, axis=tuple(range(x.ndim - 1)))
  d_xhat = dy32 * scale.astype(jnp.float32)
  dx = (inv_rms * (d_xhat - x_hat * jnp.mean(d_xhat * x_hat, axis=-1, keepdims=True))).astype(x.dtype)
  return (dx if d_stream is None else d_stream + dx), d_scale


# --- Pallas kernels (2-D [rows, dim]) ----------------------------------------------------


def _fwd_kernel(*refs, eps, has_delta):
  if has_delta:
    residual_ref, delta_ref, scale_ref, x_ref, y_ref, inv_ref = refs
    x = (residual_ref[...].astype(jnp.float32) + delta_ref[...].astype(jnp.float32)).astype(x_ref.dtype)
    x_ref[...] = x
  else:  # x is the residual itself: nothing to write
    residual_ref, scale_ref, y_ref, inv_ref = refs
    x = residual_ref[...]
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=1) + eps)
  inv_ref[...] = inv
  y_ref[...] = (x32 * inv[:, None] * scale_ref[...].astype(jnp.float32)[None, :]).astype(y_ref.dtype)


def _bwd_kernel(*refs, parts, has_stream):
  dy_refs, (x_ref, inv_ref, scale_ref), rest = refs[:parts], refs[parts:parts + 3], refs[parts + 3:]
  stream_ref, (dx_ref, dscale_ref) = (rest[0], rest[1:]) if has_stream else (None, rest)
  scale = scale_ref[...].astype(jnp.float32)[None, :]

  def step(i, d_scale):
    rows = pl.ds(i * _BWD_ROWS, _BWD_ROWS)
    inv = inv_ref[rows][:, None]
    x_hat = x_ref[rows, :].astype(jnp.float32) * inv
    dy = dy_refs[0][rows, :].astype(jnp.float32)
    for ref in dy_refs[1:]:
      dy = dy + ref[rows, :].astype(jnp.float32)
    d_xhat = dy * scale
    dx = (inv * (d_xhat - x_hat * jnp.mean(d_xhat * x_hat, axis=1, keepdims=True))).astype(dx_ref.dtype)
    if has_stream:
      dx = (stream_ref[rows, :].astype(jnp.float32) + dx.astype(jnp.float32)).astype(dx_ref.dtype)
    dx_ref[rows, :] = dx
    return d_scale + jnp.sum(dy * x_hat, axis=0)

  dim = dscale_ref.shape[-1]
  d_scale = jax.lax.fori_loop(0, _BWD_PROGRAM_ROWS // _BWD_ROWS, step, jnp.zeros((dim,), jnp.float32))
  dscale_ref[...] = d_scale[None, :]


def add_rms_norm_fwd_pallas(residual, delta, scale, eps, *, interpret: bool = False):
  rows, dim = residual.shape
  row_block = pl.BlockSpec((_FWD_ROWS, dim), lambda i: (i, 0))
  inputs = (residual,) if delta is None else (residual, delta)
  outputs = 1 if delta is None else 2  # (y) or (x, y), then 1/rms
  results = pl.pallas_call(
      functools.partial(_fwd_kernel, eps=eps, has_delta=delta is not None),
      grid=(rows // _FWD_ROWS,),
      in_specs=[row_block] * len(inputs) + [pl.BlockSpec((dim,), lambda i: (0,))],
      out_specs=[row_block] * outputs + [pl.BlockSpec((_FWD_ROWS,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((rows, dim), residual.dtype)] * outputs
      + [jax.ShapeDtypeStruct((rows,), jnp.float32)],
      interpret=interpret,
      compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=_NUM_WARPS),
      name="add_rms_norm_fwd",
  )(*inputs, scale)
  return tuple(results) if delta is not None else (residual, *results)


def rms_norm_bwd_pallas(dys, x, inv_rms, scale, d_stream, *, interpret: bool = False):
  rows, dim = x.shape
  programs = rows // _BWD_PROGRAM_ROWS
  block = pl.BlockSpec((_BWD_PROGRAM_ROWS, dim), lambda i: (i, 0))
  inputs = (*dys, x, inv_rms, scale) + (() if d_stream is None else (d_stream,))
  specs = [block] * (len(dys) + 1) + [pl.BlockSpec((_BWD_PROGRAM_ROWS,), lambda i: (i,)),
                                      pl.BlockSpec((dim,), lambda i: (0,))]
  dx, d_scale_parts = pl.pallas_call(
      functools.partial(_bwd_kernel, parts=len(dys), has_stream=d_stream is not None),
      grid=(programs,),
      in_specs=specs + ([block] if d_stream is not None else []),
      out_specs=[block, pl.BlockSpec((1, dim), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((rows, dim), x.dtype), jax.ShapeDtypeStruct((programs, dim), jnp.float32)],
      interpret=interpret,
      compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=_NUM_WARPS),
      name="rms_norm_bwd",
  )(*inputs)
  return dx, jnp.sum(d_scale_parts, axis=0)
