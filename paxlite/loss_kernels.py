"""The loss's forward pass over the logits as one Pallas kernel for GPUs: per token, the
log-partition logsumexp(logits) and the target token's logit, reading the [tokens, vocab]
logits once.

Why a kernel: XLA runs logsumexp as two reductions (the max, then the sum of exp(x - max)),
each reading the logits. As one XLA reduction of (max, sum) pairs it reads them once, but
merges element by element, an exp and four selects per element, which keeps it under the
memory's speed (1.11 ms in the 1.7B model's step, 16k x 50k bf16 logits, on an H100, where
the bytes take 0.49; session 6). Here each program takes a row block and walks the vocabulary
in chunks: one max and one rescale per chunk and row, an exp and an add per element, and the
target's logit picked up on the way (0.66 ms alone, 0.78 in the step; benchmarks/RESULTS.md,
rounds 39-41).

Arithmetic is float32 throughout, as jax.nn.logsumexp on the float32 logits: results differ
from it by float32 reassociation only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import PartitionSpec as P

from paxlite.models import norm_kernels
from paxlite.partitioning import activation_split

# Tests set this to run the kernel through Pallas's interpreter (on CPU).
INTERPRET = False

# Rows per program, vocabulary entries per step of a program's loop, warps per program: the
# fastest of benchmarks/reductions.py --sweep on an H100 for [16384, 50304] bf16 logits
# (round 39: 0.658 ms, 2.5 TB/s; two rows per program 0.729, eight warps 0.843).
ROWS = 1
CHUNK = 2048
NUM_WARPS = 4


def kernel_fits(rows: int) -> bool:
  """Whether the kernel takes `rows` tokens: the row blocks must tile them exactly."""
  return rows % ROWS == 0


def implementation(setting: str) -> str:
  """train.loss_kernel -> "pallas" | "xla" (auto: pallas on GPU)."""
  return norm_kernels.implementation(setting, "train.loss_kernel", interpret=INTERPRET)


def row_axes(kernel: str, names: tuple[str, ...], shape) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
  """The mesh axes that split the batch and the length dimensions of [batch, length, vocab]
  logits of logical `names` (empty with no mesh), when the kernel takes them; None when it
  does not: not asked for, the vocabulary split between devices (each would hold a partial
  logsumexp), or each device's rows not tiling the kernel's blocks."""
  if kernel != "pallas":
    return None
  (batch, length, _), ways = activation_split(names, shape)
  # A mesh axis of size 1 named on the vocabulary splits nothing: count the ways, not the names.
  if ways[2] > 1 or not kernel_fits(shape[0] // ways[0] * (shape[1] // ways[1])):
    return None
  return batch, length


def log_z_and_target_logit(logits_btv: jax.Array, targets_bt: jax.Array, axes) -> tuple[jax.Array, jax.Array]:
  """The kernel on [batch, length, vocab] logits split over the mesh by `axes` (row_axes):
  float32 [batch, length] logsumexp and target logit, each device on its own rows."""

  def local(logits, targets):
    b, t, v = logits.shape
    log_z, target_logit = log_z_and_target_logit_pallas(logits.reshape(b * t, v), targets.reshape(b * t))
    return log_z.reshape(b, t), target_logit.reshape(b, t)

  if not any(axes):
    return local(logits_btv, targets_bt)
  batch, length = (a or None for a in axes)
  rows = P(batch, length)
  return jax.shard_map(local, in_specs=(P(batch, length, None), rows), out_specs=(rows, rows),
                       check_vma=False)(logits_btv, targets_bt)


def _kernel(logits_ref, targets_ref, log_z_ref, target_logit_ref, *, vocab, rows, chunk):
  block = pl.ds(pl.program_id(0) * rows, rows)
  targets = targets_ref[block]

  def step(c, carry):
    running_max, running_sum, target_logit = carry
    columns = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (rows, chunk), 1)
    x = pl_triton.load(logits_ref.at[block, pl.ds(c * chunk, chunk)], mask=columns < vocab,
                       other=-jnp.inf).astype(jnp.float32)
    new_max = jnp.maximum(running_max, jnp.max(x, axis=1))
    # A row whose max is +inf sums exp(x) instead (x - inf would be NaN at the inf itself):
    # its logsumexp is +inf either way, as jax.nn.logsumexp's.
    shift = jnp.where(new_max == jnp.inf, 0.0, new_max)
    running_sum = running_sum * jnp.exp(running_max - shift) + jnp.sum(jnp.exp(x - shift[:, None]), axis=1)
    target_logit = target_logit + jnp.sum(jnp.where(columns == targets[:, None], x, 0.0), axis=1)
    return new_max, running_sum, target_logit

  # The lowest finite float as the empty max: a row of -inf then sums exp(-inf - lowest) = 0,
  # and its logsumexp is lowest + log(0) = -inf, not NaN.
  start = (jnp.full((rows,), jnp.finfo(jnp.float32).min, jnp.float32), jnp.zeros((rows,), jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  running_max, running_sum, target_logit = jax.lax.fori_loop(0, pl.cdiv(vocab, chunk), step, start)
  log_z_ref[block] = running_max + jnp.log(running_sum)
  target_logit_ref[block] = target_logit


def log_z_and_target_logit_pallas(logits: jax.Array, targets: jax.Array, *, rows: int = ROWS,
                                  chunk: int = CHUNK, num_warps: int = NUM_WARPS) -> tuple[jax.Array, jax.Array]:
  """[tokens, vocab] logits (any float dtype) and [tokens] int targets -> float32 [tokens]
  logsumexp and target logit. `tokens` must be a multiple of `rows` (kernel_fits)."""
  tokens, vocab = logits.shape
  whole = pl.no_block_spec
  out = jax.ShapeDtypeStruct((tokens,), jnp.float32)
  return pl.pallas_call(
      functools.partial(_kernel, vocab=vocab, rows=rows, chunk=chunk),
      grid=(tokens // rows,),
      in_specs=[whole, whole],
      out_specs=[whole, whole],
      out_shape=[out, out],
      interpret=INTERPRET,
      compiler_params=None if INTERPRET else pl_triton.CompilerParams(num_warps=num_warps),
      name="log_z_and_target_logit",
  )(logits, targets.astype(jnp.int32))
