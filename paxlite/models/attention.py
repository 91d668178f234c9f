"""Grouped-query causal self-attention with rotary embeddings.

Projections are per-head einsums so that the 'heads' / 'kv_heads' dimensions are visible to
the rules table: with heads on `tensor`, q/k/v are column-parallel and the output projection
row-parallel, which costs one all-reduce per attention block (Megatron-style).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from paxlite.config import ModelConfig
from paxlite.models.blockwise import blockwise_attention
from paxlite.models.layers import Einsum, rotary, scaled_normal
from paxlite.partitioning import constrain



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

  def __init__(self, cfg: ModelConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
    d, n = cfg.d_model, cfg.num_heads
    k = cfg.num_kv_heads or n
    h = cfg.head_dim or d // n
    self.rope_theta = cfg.rope_theta
    self.attention = cfg.attention
    common = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    init_in = scaled_normal(cfg.init_std)
    # Output projection scaled down with depth (GPT-2 style) so residual growth stays bounded.
    init_out = scaled_normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    self.q = Einsum("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), init=init_in, **common)
    self.k = Einsum("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), init=init_in, **common)
    self.v = Einsum("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), init=init_in, **common)
    self.o = Einsum("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), init=init_out, **common)

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
    q = constrain(rotary(self.q(x_btd), positions_bt, self.rope_theta), ("batch", "length", "act_heads", "head_dim"))
    k = constrain(rotary(self.k(x_btd), positions_bt, self.rope_theta), ("batch", "length", "act_kv_heads", "head_dim"))
    v = constrain(self.v(x_btd), ("batch", "length", "act_kv_heads", "head_dim"))
    # Softmax runs in float32 inside the fused kernel (cuDNN) or XLA's lowering.
    implementation = attention_implementation(self.attention, q.dtype)
    if implementation == "blockwise":
      out = blockwise_attention(q, k, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
    return self.o(out)
