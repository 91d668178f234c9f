"""The optimizer: AdamW behind global-norm clipping, its learning-rate schedule, and the
shape of its state.

The gradient norm is summed layer by layer where the layers are unrolled (`global_norm`), and
the optimizer takes the parameters either stacked or layered (paxlite.step_state), so one
optax transformation serves the train step, checkpoints and the sharding table.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from paxlite.config import Config


def map_moments(f: Callable[[Any], Any], opt_state: Any, param_treedef: Any,
                other: Callable[[Any], Any] = lambda leaf: leaf) -> Any:
  """`opt_state` with `f` applied to every subtree structured like the parameters
  (`param_treedef`: Adam's moments) and `other` to every other leaf (counts)."""
  is_params = lambda node: jax.tree.structure(node) == param_treedef
  return jax.tree.map(lambda node: f(node) if is_params(node) else other(node), opt_state, is_leaf=is_params)


def opt_state_like(abstract_opt: Any, param_shapes: Any, params_like: Any, other: Any) -> Any:
  """A tree shaped like the optimizer state: every subtree shaped like the parameters (Adam's
  moments) becomes `params_like`, every other leaf (counts) `other`. With shardings, the
  moments are sharded exactly like their parameters (ZeRO: split over fsdp)."""
  return map_moments(lambda _: params_like, abstract_opt, jax.tree.structure(param_shapes), lambda _: other)


def lr_schedule(cfg: Config) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up to train.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
  t = cfg.train
  peak, floor = t.lr, t.lr * t.min_lr_ratio
  warmup, total = t.warmup_steps, t.steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, decayed)

  return schedule


def global_norm(grads: Any, per_layer: Any) -> jax.Array:
  """The L2 norm of all of `grads`, as optax.tree.norm, except that a leaf whose `per_layer`
  entry is True (a leading axis of layers, the whole leaf on every device) is summed layer by
  layer. With unrolled layers such a gradient is the concatenation of the layers' own: XLA
  reduces a concatenation element by element through a choice among its 24 operands, at
  half the memory bandwidth (0.5 ms per MLP kernel on an H100 where its bytes take 0.27;
  benchmarks/RESULTS.md, round 30), while a slice of one is that layer's gradient itself.

  `per_layer` may be a prefix of `grads`: a leaf held as a list of its layers (the train
  step's layered state, paxlite.step_state) is summed layer by layer, in the same order."""

  def squares(by_layer, g):
    if isinstance(g, list):
      return sum(jnp.sum(jnp.square(layer)) for layer in g)
    if by_layer and g.shape[0] > 1:
      return sum(jnp.sum(jnp.square(layer)) for layer in jax.lax.split(g, (1,) * g.shape[0]))
    return jnp.sum(jnp.square(g))

  return jnp.sqrt(sum(jax.tree.leaves(jax.tree.map(squares, per_layer, grads))))


def clip_by_global_norm(max_norm: float, per_layer: Any) -> optax.GradientTransformation:
  """optax.clip_by_global_norm with the norm of `global_norm`: the same arithmetic."""

  def update(updates, state, params=None):
    del params
    norm = global_norm(updates, per_layer)
    keep = norm < max_norm
    return jax.tree.map(lambda g: jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(cfg: Config, logical_names: dict, per_layer: Any = None) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on vectors (norm scales) and, unless
  train.decay_embeddings, on the token embedding table. `per_layer`: see `global_norm`
  (default: no leaf summed by layer). `logical_names` and `per_layer` name the parameters'
  stacked leaves; the optimizer takes the parameters stacked or layered (paxlite.step_state)."""
  t = cfg.train
  if per_layer is None:
    per_layer = jax.tree.map(lambda _: False, logical_names, is_leaf=lambda x: isinstance(x, tuple))

  def decays(names):
    names = names[1:] if names[:1] == ("layers",) else names  # a stacked block's norm scale is a vector
    if len(names) < 2:
      return False
    is_embedding = tuple(names[-2:]) == ("vocab", "embed")
    return t.decay_embeddings or not is_embedding

  mask = jax.tree.map(decays, logical_names, is_leaf=lambda x: isinstance(x, tuple))
  parts = [clip_by_global_norm(t.grad_clip, per_layer)] if t.grad_clip > 0 else []
  parts.append(optax.adamw(lr_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=mask))
  return optax.chain(*parts)
