"""Blockwise causal attention with flash-attention memory, in plain JAX (any backend).

Keys and values are visited in blocks with an online softmax (Milakov & Gimelshein 2018;
FlashAttention, Dao et al. 2022), so the [length, length] scores never exist whole: the largest
temporary is [batch, heads, length, block]. The backward pass (a custom VJP) recomputes the
probabilities block by block from the saved log-sum-exp, so what a layer keeps for backward is
q, k, v, the output and one float32 log-sum-exp per query and head: what cuDNN's fused flash
attention keeps. That makes it the stand-in `paxlite plan` compiles on CPU for a GPU target
(see paxlite/plan.py); `model.attention: blockwise` also trains with it where XLA's attention
would not fit. Fully masked blocks are computed and masked, not skipped: about twice the
attention FLOPs of a causal kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

SAVE_NAME = "attention_fwd"
"""checkpoint_name of the forward's output and log-sum-exp: remat policies that keep the fused
attention's forward (dots_attention_saveable) keep these."""

_MASKED = -1e30  # finite: exp(_MASKED - m) is 0 without inf - inf = nan


def _block_size(length: int, block: int) -> int:
  """The largest divisor of `length` that is at most `block`."""
  return max(d for d in range(1, min(block, length) + 1) if length % d == 0)


def _scores(q_bkgth, k_bskh, first, scale):
  """Scaled float32 scores of all queries against keys [first, first + s), causally masked."""
  s_bkgts = jnp.einsum("bkgth,bskh->bkgts", q_bkgth, k_bskh, preferred_element_type=jnp.float32) * scale
  t, s = q_bkgth.shape[3], k_bskh.shape[1]
  visible_ts = jnp.arange(t)[:, None] >= first + jnp.arange(s)[None, :]
  return jnp.where(visible_ts, s_bkgts, _MASKED)


def _split(x_btnh, kv_heads):
  b, t, n, h = x_btnh.shape
  return x_btnh.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [b, k, g, t, h]


def _merge(x_bkgth):
  b, k, g, t, h = x_bkgth.shape
  return x_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def _blocks(x_bskh, size):  # [b, t, k, h] -> [t / size, b, size, k, h]
  b, t, k, h = x_bskh.shape
  return x_bskh.reshape(b, t // size, size, k, h).swapaxes(0, 1)


def _forward(q_btnh, k_btkh, v_btkh, block):
  kv_heads, head_dim = k_btkh.shape[2], q_btnh.shape[3]
  size = _block_size(k_btkh.shape[1], block)
  scale = head_dim ** -0.5
  q_bkgth = _split(q_btnh, kv_heads)
  b, k, g, t, h = q_bkgth.shape

  def step(carry, xs):
    m_bkgt, l_bkgt, acc_bkgth = carry
    index, k_bskh, v_bskh = xs
    s_bkgts = _scores(q_bkgth, k_bskh, index * size, scale)
    m_new = jnp.maximum(m_bkgt, s_bkgts.max(axis=-1))
    correction = jnp.exp(m_bkgt - m_new)
    p_bkgts = jnp.exp(s_bkgts - m_new[..., None])
    l_bkgt = l_bkgt * correction + p_bkgts.sum(axis=-1)
    pv = jnp.einsum("bkgts,bskh->bkgth", p_bkgts.astype(v_bskh.dtype), v_bskh, preferred_element_type=jnp.float32)
    return (m_new, l_bkgt, acc_bkgth * correction[..., None] + pv), None

  init = (jnp.full((b, k, g, t), _MASKED, jnp.float32), jnp.zeros((b, k, g, t), jnp.float32),
          jnp.zeros((b, k, g, t, h), jnp.float32))
  xs = (jnp.arange(t // size), _blocks(k_btkh, size), _blocks(v_btkh, size))
  # Block 0 holds key 0, which every query sees: after it every row's max is finite.
  (m_bkgt, l_bkgt, acc_bkgth), _ = jax.lax.scan(step, init, xs)
  out_btnh = _merge(acc_bkgth / l_bkgt[..., None]).astype(q_btnh.dtype)
  return out_btnh, m_bkgt + jnp.log(l_bkgt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def blockwise_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, block: int = 512) -> jax.Array:
  """Causal grouped-query attention: q [b, t, n, h], k and v [b, t, k, h] (k divides n) ->
  [b, t, n, h], softmax in float32, keys in blocks of at most `block` positions."""
  return _forward(q_btnh, k_btkh, v_btkh, block)[0]


def _fwd(q_btnh, k_btkh, v_btkh, block):
  out_btnh, lse_bkgt = _forward(q_btnh, k_btkh, v_btkh, block)
  out_btnh, lse_bkgt = checkpoint_name(out_btnh, SAVE_NAME), checkpoint_name(lse_bkgt, SAVE_NAME)
  return out_btnh, (q_btnh, k_btkh, v_btkh, out_btnh, lse_bkgt)


def _bwd(block, residuals, dout_btnh):
  q_btnh, k_btkh, v_btkh, out_btnh, lse_bkgt = residuals
  kv_heads = k_btkh.shape[2]
  size = _block_size(k_btkh.shape[1], block)
  scale = q_btnh.shape[3] ** -0.5
  q_bkgth = _split(q_btnh, kv_heads)
  do_bkgth = _split(dout_btnh, kv_heads)
  delta_bkgt = jnp.sum(do_bkgth.astype(jnp.float32) * _split(out_btnh, kv_heads).astype(jnp.float32), axis=-1)

  def step(dq_bkgth, xs):
    index, k_bskh, v_bskh = xs
    p_bkgts = jnp.exp(_scores(q_bkgth, k_bskh, index * size, scale) - lse_bkgt[..., None])
    dv_bskh = jnp.einsum("bkgts,bkgth->bskh", p_bkgts.astype(do_bkgth.dtype), do_bkgth,
                         preferred_element_type=jnp.float32)
    dp_bkgts = jnp.einsum("bkgth,bskh->bkgts", do_bkgth, v_bskh, preferred_element_type=jnp.float32)
    ds_bkgts = (p_bkgts * (dp_bkgts - delta_bkgt[..., None]) * scale).astype(q_bkgth.dtype)
    dq_bkgth = dq_bkgth + jnp.einsum("bkgts,bskh->bkgth", ds_bkgts, k_bskh, preferred_element_type=jnp.float32)
    dk_bskh = jnp.einsum("bkgts,bkgth->bskh", ds_bkgts, q_bkgth, preferred_element_type=jnp.float32)
    return dq_bkgth, (dk_bskh.astype(k_bskh.dtype), dv_bskh.astype(v_bskh.dtype))

  t = k_btkh.shape[1]
  xs = (jnp.arange(t // size), _blocks(k_btkh, size), _blocks(v_btkh, size))
  dq_bkgth, (dk_nbskh, dv_nbskh) = jax.lax.scan(step, jnp.zeros(q_bkgth.shape, jnp.float32), xs)
  unblock = lambda x: x.swapaxes(0, 1).reshape(k_btkh.shape)
  return _merge(dq_bkgth).astype(q_btnh.dtype), unblock(dk_nbskh), unblock(dv_nbskh)


blockwise_attention.defvjp(_fwd, _bwd)
