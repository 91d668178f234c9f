"""Autoregressive decoding with a KV cache: `generate` (tokens) and `sample_text` (strings).

One compiled program per (batch, prompt-length bucket, max_new_tokens): a prefill of the
padded prompts writes the cache, then a `lax.while_loop` feeds one token per row per step
(it stops early once every row has produced `eos_id`). The cache is stacked like the
decoder blocks, keys and values [layers, batch, cache_len, kv_heads, head_dim], and sharded
by the rules table like the activations it holds (batch over data/fsdp, kv_heads over
tensor). Temperature, top-k, top-p and the seed are traced values: changing them does not
recompile.

Prompts of different lengths are right-padded to a bucket (the next power of two, at least
16). Row b's token at position p only ever attends to cache slots 0..p, and slots below
p always hold row b's prompt or its own generated tokens, so padding is never seen.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from paxlite.config import DEFAULT_RULES, ConfigError
from paxlite.partitioning import Rules, axis_rules, current_rules, resolve

_MIN_BUCKET = 16


def prompt_bucket(length: int) -> int:
  """Padded prompt length: the next power of two >= length (at least 16), so that prompts of
  similar lengths share one compiled program."""
  return max(_MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def model_mesh(model: nnx.Module) -> Mesh | None:
  """The mesh a model's parameters are sharded on (None when they are not NamedSharded)."""
  for leaf in jax.tree.leaves(nnx.state(model)):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def batch_ways(mesh: Mesh, rules: Rules) -> int:
  """How many ways the rules split a batch dimension on `mesh` (inputs are padded to it)."""
  axes = resolve(("batch",), rules)[0]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules: Rules) -> Iterator[None]:
  """Mesh and rules in force while tracing (nothing when the model is not on a mesh)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), axis_rules(rules):
    yield


def filter_logits(logits_bv: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Logits / temperature with everything outside the top-k and the top-p nucleus set to -inf.

  top_k <= 0 keeps every token; top_p = 1 keeps every token; the most likely token is always
  kept. Ties at a cut-off are all kept.
  """
  vocab = logits_bv.shape[-1]
  scaled_bv = logits_bv / jnp.maximum(temperature, 1e-6)
  sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth_b1 = jax.lax.dynamic_slice_in_dim(sorted_bv, k - 1, 1, axis=-1)
  sorted_bv = jnp.where(sorted_bv >= kth_b1, sorted_bv, -jnp.inf)
  # Nucleus: the smallest prefix of the sorted distribution whose mass reaches top_p.
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  keep_bv = (mass_before_bv < top_p) & (sorted_bv > -jnp.inf)
  cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled_bv >= cutoff_b1, scaled_bv, -jnp.inf)


def _next_token(logits_bv, key, temperature, top_k, top_p):
  sampled_b = jax.random.categorical(key, filter_logits(logits_bv, temperature, top_k, top_p), axis=-1)
  return jnp.where(temperature > 0, sampled_b, jnp.argmax(logits_bv, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len"))
def _generate(graphdef, state, tokens_bt, lengths_b, key, temperature, top_k, top_p, eos_id, *,
              max_new_tokens: int, cache_len: int):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens_bt.shape
  positions_bt = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), tokens_bt.shape)
  last_b1v, cache = model.decode(tokens_bt, positions_bt, model.init_cache(batch, cache_len), lengths_b - 1)
  first_b = _next_token(last_b1v[:, 0], jax.random.fold_in(key, 0), temperature, top_k, top_p)
  out_bn = jnp.full((batch, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_b)

  def keep_going(carry):
    i, _, _, _, done_b = carry
    return (i < max_new_tokens) & ~jnp.all(done_b)

  def step(carry):
    i, token_b, cache, out_bn, done_b = carry
    # The token generated at step i-1 sits at position length + i - 1.
    logits_b1v, cache = model.decode(token_b[:, None], (lengths_b + i - 1)[:, None], cache)
    token_b = _next_token(logits_b1v[:, 0], jax.random.fold_in(key, i), temperature, top_k, top_p)
    token_b = jnp.where(done_b, eos_id, token_b)
    return i + 1, token_b, cache, out_bn.at[:, i].set(token_b), done_b | (token_b == eos_id)

  carry = (jnp.int32(1), first_b, cache, out_bn, first_b == eos_id)
  return jax.lax.while_loop(keep_going, step, carry)[3]


def _check(name: str, ok: bool, expected: str, value: Any) -> None:
  if not ok:
    raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]] | np.ndarray, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, rules: Rules | None = None) -> np.ndarray:
  """Continues each prompt by `max_new_tokens` tokens; returns them, int32 [batch, max_new_tokens].

  prompts: token ids, an int array [batch, length] or a list of sequences of any lengths.
  temperature 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits /
  temperature) restricted to the top_k most likely (0: all) and to the top_p nucleus.
  A row that produces `eos_id` is filled with eos_id from there on. The model's parameters
  decide the mesh (see paxlite.load_run); `rules` is the rules table (default: the one set
  with paxlite.partitioning.axis_rules, else paxlite's default table).

  >>> model, cfg = load_run("runs/tiny")
  >>> new = generate(model, [[72, 101, 108]], max_new_tokens=20, rules=cfg.rules)
  """
  rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
  cfg = model.cfg
  max_len = cfg.max_seq_len or cfg.seq_len
  _check("prompts", len(rows) > 0, "at least one prompt", prompts)
  _check("prompts", all(r.size for r in rows), "non-empty prompts", [r.size for r in rows])
  _check("prompts", all(0 <= r.min() and r.max() < cfg.vocab_size for r in rows),
         f"token ids in [0, {cfg.vocab_size})", [(int(r.min()), int(r.max())) for r in rows])
  _check("max_new_tokens", isinstance(max_new_tokens, int) and max_new_tokens > 0, "a positive integer", max_new_tokens)
  _check("temperature", temperature >= 0, "a number >= 0", temperature)
  _check("top_k", isinstance(top_k, int) and top_k >= 0, "an integer >= 0 (0: no limit)", top_k)
  _check("top_p", 0 < top_p <= 1, "a number in (0, 1]", top_p)
  longest = max(r.size for r in rows)
  if longest + max_new_tokens > max_len:
    raise ConfigError(f"max_new_tokens: a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds "
                      f"model.max_seq_len={max_len} (an override model.max_seq_len=N allows more)")

  mesh = model_mesh(model)
  rules = rules if rules is not None else (current_rules() or DEFAULT_RULES)
  batch = len(rows)
  if mesh is not None:
    # Pad the batch with dummy rows up to a multiple of the devices the batch is split over.
    ways = batch_ways(mesh, rules)
    batch = -(-batch // ways) * ways
  bucket = prompt_bucket(longest)
  tokens_bt = np.zeros((batch, bucket), np.int32)
  lengths_b = np.ones((batch,), np.int32)
  for i, row in enumerate(rows):
    tokens_bt[i, : row.size] = row
    lengths_b[i] = row.size

  graphdef, state = nnx.split(model)
  if mesh is not None:
    tokens_bt = jax.device_put(tokens_bt, NamedSharding(mesh, resolve(("batch", "length"), rules)))
  with activate(mesh, rules):
    out = _generate(graphdef, state, tokens_bt, lengths_b, jax.random.key(seed), jnp.float32(temperature),
                    jnp.int32(top_k), jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id),
                    max_new_tokens=max_new_tokens, cache_len=bucket + max_new_tokens)
  return np.asarray(jax.device_get(out))[: len(rows)]


def sample_text(model: nnx.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                rules: Rules | None = None, **options: Any) -> list[str]:
  """Encodes `prompts` with `tokenizer` (paxlite.data), generates (by default as many tokens
  as model.max_seq_len leaves room for), and decodes each continuation up to (not
  including) the tokenizer's end-of-text token. `options` go to `generate`."""
  encoded = [tokenizer.encode(p) for p in prompts]
  for i, ids in enumerate(encoded):
    if not len(ids):
      raise ConfigError(f"--prompt: prompt {i + 1} is empty (it encodes to no tokens)")
  if max_new_tokens is None:
    max_len = model.cfg.max_seq_len or model.cfg.seq_len
    longest = max(len(ids) for ids in encoded)
    if longest >= max_len:
      raise ConfigError(f"--prompt: a prompt of {longest} tokens leaves no room under model.max_seq_len={max_len}")
    max_new_tokens = max_len - longest
  eos_id = tokenizer.eos_id
  out_bn = generate(model, encoded, max_new_tokens=max_new_tokens, eos_id=eos_id, rules=rules, **options)
  texts = []
  for row in out_bn:
    if eos_id is not None and eos_id in row:
      row = row[: list(row).index(eos_id)]
    texts.append(tokenizer.decode(row))
  return texts
