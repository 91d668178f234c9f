"""Grouped-query causal self-attention with rotary embeddings.

Projections are per-head einsums so that the 'heads' / 'kv_heads' dimensions are visible to
the rules table: with heads on `tensor`, q/k/v are column-parallel and the output projection
row-parallel, which costs one all-reduce per attention block (Megatron-style).

Decoding passes one layer's KV cache: the same projections and rotary embedding, then the
queries attend over the cache instead of over their own sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from paxlite.config import ModelConfig
from paxlite.models.blockwise import blockwise_attention
from paxlite.models.layers import Einsum, rotary, scaled_normal
from paxlite.numerics import Fp8Recipe
from paxlite.partitioning import constrain

# checkpoint_name of the attention kernel's inputs (rotated queries and keys, values), which
# the forward pass materialises anyway: a remat policy that keeps them spares the backward
# pass re-running the rotary embedding.
ATTENTION_INPUTS = "attention_inputs"

KV = tuple[jax.Array, jax.Array]


def attention_implementation(setting: str, dtype) -> str:
  """'auto' picks cuDNN's fused flash attention on GPU for 16-bit inputs, XLA otherwise.

  jax.nn.dot_product_attention's own default (None) is XLA everywhere, which on a GPU
  materialises the [batch, heads, length, length] scores: at seq 2048 that costs more memory
  than the whole 1.7B model's weights and optimizer state.
  """
  if setting != "auto":
    return setting
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs, fp8: Fp8Recipe | None = None):
    d, n = cfg.d_model, cfg.num_heads
    k = cfg.num_kv_heads or n
    h = cfg.head_dim or d // n
    self.rope_theta = cfg.rope_theta
    self.attention = cfg.attention
    common = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs, fp8=fp8)
    init_in = scaled_normal(cfg.init_std)
    # Output projection scaled down with depth (GPT-2 style) so residual growth stays bounded.
    init_out = scaled_normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    self.q = Einsum("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), init=init_in, **common)
    self.k = Einsum("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), init=init_in, **common)
    self.v = Einsum("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), init=init_in, **common)
    self.o = Einsum("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), init=init_out, **common)

  def __call__(self, x_btd: jax.Array | tuple[jax.Array, jax.Array, jax.Array], positions_bt: jax.Array,
               kv_cache: KV | None = None) -> tuple[jax.Array, KV]:
    """Attention over the sequence itself (training), or over a KV cache (decoding). `x_btd`:
    the input, or one copy of it for each of q, k and v (RMSNorm.add_and_norm).

    Returns the output and this call's own keys and values (rotated), [b, t, kv_heads,
    head_dim] each, for the caller to store in its cache. With `kv_cache` = one layer's
    (keys, values) [b, s, kv_heads, head_dim], the new keys and values are first written at
    `positions_bt`, then each query at position p attends to cache slots 0..p.
    """
    x_q, x_k, x_v = x_btd if isinstance(x_btd, tuple) else (x_btd,) * 3
    x_history = self.q.input_history()  # one fp8 quantisation of x for q, k and v
    q = self.q(x_q, x_history)
    q = constrain(rotary(q, positions_bt, self.rope_theta), ("batch", "length", "act_heads", "head_dim"))
    k = self.k(x_k, x_history)
    k = constrain(rotary(k, positions_bt, self.rope_theta), ("batch", "length", "act_kv_heads", "head_dim"))
    v = constrain(self.v(x_v, x_history), ("batch", "length", "act_kv_heads", "head_dim"))
    if kv_cache is None:
      # Softmax runs in float32 inside the fused kernel (cuDNN) or XLA's lowering.
      implementation = attention_implementation(self.attention, q.dtype)
      q, k, v = (checkpoint_name(a, ATTENTION_INPUTS) for a in (q, k, v))
      if implementation == "blockwise":
        out = blockwise_attention(q, k, v)
      else:
        out = jax.nn.dot_product_attention(*_cpu_float16_safe(q, k, v), is_causal=True,
                                           implementation=implementation)
    else:
      keys, values = (write_at(c, new, positions_bt) for c, new in zip(kv_cache, (k, v)))
      # Slots past a query's position hold padding or stale entries: masked, never read.
      mask_b1ts = (jnp.arange(keys.shape[1])[None, None, :] <= positions_bt[:, :, None])[:, None]
      # XLA's kernel: cuDNN's flash kernel takes no arbitrary mask, and a decode step (one
      # query per row) is bound by reading the cache, not by the matrix units.
      out = jax.nn.dot_product_attention(*_cpu_float16_safe(q, keys.astype(q.dtype), values.astype(q.dtype)),
                                         mask=mask_b1ts, implementation="xla")
    out = constrain(out.astype(x_q.dtype), ("batch", "length", "act_heads", "head_dim"))
    return self.o(out), (k, v)


def _cpu_float16_safe(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """XLA:CPU has no float16 x float16 -> float32 dot, the algorithm jax's attention asks for;
  float32 inputs give the same products there (float16 products are exact in float32)."""
  if arrays[0].dtype == jnp.float16 and jax.default_backend() == "cpu":
    return tuple(a.astype(jnp.float32) for a in arrays)
  return arrays


def write_at(cache: jax.Array, new_btkh: jax.Array, positions_bt: jax.Array, *leading: jax.Array) -> jax.Array:
  """The cache [*leading, b, s, kv_heads, head_dim] with row b's slots positions_bt[b] set to
  new_btkh[b] (each row at its own positions); `leading` indexes e.g. the stacked layer."""
  rows_b1 = jnp.arange(new_btkh.shape[0])[:, None]
  return cache.at[(*leading, rows_b1, positions_bt)].set(new_btkh.astype(cache.dtype), mode="drop")
