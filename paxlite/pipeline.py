"""Pipeline parallelism over the `stage` mesh axis: GPipe and circular (interleaved) schedules.

The decoder's stacked layers [L, ...] are viewed as [P stages, R repeats, L/(P R) layers]:
stage p holds virtual stages p, p + P, ..., p + (R-1) P. Every iteration all P stages run at
once (a `vmap` over the stage dimension, which the rules shard over `stage`), then the
activations shift one stage on (`jnp.roll` on a stage-sharded dimension, which XLA lowers to
a collective permute). Micro-batch m's pass r enters stage 0 at iteration r M + m, so the
loop runs M R + P - 1 iterations and the idle ("bubble") fraction is (P - 1) / (M R + P - 1);
R = 1 is GPipe. Each iteration is rematerialised, so activation memory grows with the number
of micro-batches, not with micro-batches x layers. Gradients come from autodiff through the
scan. Checkpoints stay layout-free: weights are stored in natural layer order and regrouped
inside the step (for R > 1 that regrouping moves (R-1)/R of the layer weights between stages
once per step; for GPipe it moves nothing).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from paxlite.partitioning import constrain

LayerFn = Callable[[Any, Any], Any]  # (per-micro-batch inputs pytree, one layer's weights) -> outputs


@dataclasses.dataclass(frozen=True)
class Schedule:
  stages: int
  microbatches: int
  repeats: int = 1

  @property
  def iterations(self) -> int:
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble(self) -> float:
    """Fraction of stage-iterations that are idle: (P - 1) / (M R + P - 1)."""
    return (self.stages - 1) / self.iterations


def _index(tree: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False), tree)


def _stage_weights(params: Any, names: Any, schedule: Schedule) -> Any:
  """[L, ...] -> [P, R, L/(P R), ...], the stage dimension sharded by the 'layers' rule."""
  p, r = schedule.stages, schedule.repeats

  def regroup(a, logical):
    per = a.shape[0] // (p * r)
    grouped = jnp.swapaxes(a.reshape(r, p, per, *a.shape[1:]), 0, 1)
    return constrain(grouped, ("layers", None, None) + tuple(logical[1:]))

  return jax.tree.map(regroup, params, names, is_leaf=lambda x: isinstance(x, tuple))


def pipeline_apply(layer_fn: LayerFn, params: Any, names: Any, inputs: Any, schedule: Schedule,
                   remat_policy: Callable[..., bool] | None = None) -> Any:
  """Runs every micro-batch of `inputs` (leaves [M, b, ...]) through all L layers.

  `params` holds the stacked layer weights (leaves [L, ...]) and `names` their logical axis
  names; `layer_fn(x, weights)` applies one layer to one micro-batch's inputs pytree.
  Returns the outputs with the inputs' structure, [M, b, ...].
  """
  p, m, r = schedule.stages, schedule.microbatches, schedule.repeats
  weights = _stage_weights(params, names, schedule)

  def run_stage(stage_weights, repeat, x):
    def body(carry, layer_weights):
      return layer_fn(carry, layer_weights), None

    out, _ = jax.lax.scan(body, x, _index(stage_weights, repeat))
    return out

  # spmd_axis_name puts the vmapped stage dimension of every inner sharding constraint on
  # the `stage` mesh axis, so each device group runs exactly its own stage.
  all_stages = jax.vmap(run_stage, spmd_axis_name="stage")

  def iteration(carry, t):
    state, done = carry
    slot = t % m
    # Stage 0 takes a fresh micro-batch on the first pass, else the micro-batch's output
    # of its previous pass through the last stage (circular schedule).
    first = jax.tree.map(lambda a, d: jnp.where(t < m, a[slot], d[slot]), inputs, done)
    state = jax.tree.map(lambda s, f: s.at[0].set(f), state, first)
    item = t - jnp.arange(p)  # which (pass, micro-batch) each stage works on
    repeat = jnp.clip(item // m, 0, r - 1)
    out = all_stages(weights, repeat, state)
    last_item = t - (p - 1)
    valid = (last_item >= 0) & (last_item < m * r)
    last_slot = jnp.maximum(last_item, 0) % m
    done = jax.tree.map(
        lambda d, o: jax.lax.dynamic_update_index_in_dim(d, jnp.where(valid, o[p - 1], d[last_slot]), last_slot, 0),
        done, out)
    state = jax.tree.map(lambda o: jnp.roll(o, 1, axis=0), out)  # stage s+1 receives stage s's output
    return (state, done), None

  if remat_policy is not None:
    iteration = jax.checkpoint(iteration, policy=remat_policy)
  state0 = jax.tree.map(lambda a: jnp.zeros((p,) + a.shape[1:], a.dtype), inputs)
  done0 = jax.tree.map(jnp.zeros_like, inputs)
  (_, done), _ = jax.lax.scan(iteration, (state0, done0), jnp.arange(schedule.iterations))
  return done
