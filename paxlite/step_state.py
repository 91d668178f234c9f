"""The train state as the compiled train step carries it from one step to the next.

Everywhere else (checkpoints, evaluation, export, sampling, users' code) each decoder-block
array has a leading axis of layers, as the model stores it: the stacked, public form of the
train state. With unrolled layers and a compute dtype narrower than the parameters' (and
precision.compute_copy on), the step carries another form instead:

- each stacked parameter, and each optimizer moment of one, as one array per layer, and
- the blocks' kernels also in compute dtype, one array per layer ('compute_copy'), written by
  the optimizer's pass as it writes the float32 kernels.

Why: the unrolled model reads each layer's kernels in compute dtype. From stacked float32
kernels that takes a pass of its own at the start of every step, which casts them and splits
them into layers (3.2 ms of an H100's 323 ms step on configs/bench-1.7b.yaml), while the
update writing each layer's bf16 kernel beside its float32 one costs 1.7 ms more than the
stacked update (benchmarks/RESULTS.md, round 42). A stacked compute-dtype copy would not do:
XLA copies each layer's slice out of it before a GEMM reads it (round 30). The values are
the same either way, since the model casts the kernels to compute dtype itself.

The step hands the model the layers stacked again (`StepLayout.restack`); XLA folds the
model's split of that stack back into the layers' own arrays, so nothing is copied.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from paxlite.optimizer import map_moments
from paxlite.partitioning import split_ways

COPY = "compute_copy"


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """Which parameters the step carries layer by layer, and which also in compute dtype.

  `layered` and `copied` hold one flag per leaf of the (stacked) parameter tree `treedef`, in
  its flattening order; every copied leaf is layered."""

  treedef: Any
  layered: tuple[bool, ...]
  copied: tuple[bool, ...]
  num_layers: int
  compute_dtype: Any

  @classmethod
  def build(cls, param_shapes: Any, logical_names: Any, specs: Any, mesh_shape: dict[str, int], num_layers: int,
            compute_dtype, is_copied) -> "StepLayout | None":
    """Layers every leaf whose first logical axis is 'layers', where the mesh does not split
    that axis; copies those of them for which `is_copied(key path)` holds. None: nothing to
    copy."""
    paths_and_shapes, treedef = jax.tree_util.tree_flatten_with_path(param_shapes)
    names = treedef.flatten_up_to(logical_names)
    whole = lambda spec, shape: split_ways(spec, len(shape), mesh_shape)[0] == 1
    layered = tuple(bool(tuple(n[:1]) == ("layers",) and whole(spec, shape.shape))
                    for n, spec, (_, shape) in zip(names, treedef.flatten_up_to(specs), paths_and_shapes))
    copied = tuple(lay and bool(is_copied(path)) for lay, (path, _) in zip(layered, paths_and_shapes))
    if not any(copied):
      return None
    return cls(treedef, layered, copied, num_layers, jnp.dtype(compute_dtype))

  # -- trees shaped like the parameters -------------------------------------------------

  def unstack(self, params_like: Any) -> Any:
    """A stacked parameter-shaped tree with each layered leaf as a list of its layers."""
    leaves = self.treedef.flatten_up_to(params_like)
    return self.treedef.unflatten([[a[i] for i in range(self.num_layers)] if lay else a
                                   for lay, a in zip(self.layered, leaves)])

  def restack(self, layered_like: Any) -> Any:
    """The inverse of `unstack`."""
    parts = self.treedef.flatten_up_to(layered_like)
    return self.treedef.unflatten([jnp.stack(p) if lay else p for lay, p in zip(self.layered, parts)])

  def expand(self, tree: Any, each_layer=lambda value: value) -> Any:
    """A stacked-structured tree of per-leaf values (shardings) in the layered structure:
    `each_layer(value)` for each layer of a layered leaf."""
    values = self.treedef.flatten_up_to(tree)
    return self.treedef.unflatten([[each_layer(v)] * self.num_layers if lay else v
                                   for lay, v in zip(self.layered, values)])

  def copied_layers(self, layered_tree: Any) -> tuple[list[Any], ...]:
    """The layers of the copied leaves of a layered parameter-shaped tree, leaf by leaf."""
    parts = self.treedef.flatten_up_to(layered_tree)
    return tuple(list(layers) for c, layers in zip(self.copied, parts) if c)

  def copies(self, layered_params: Any) -> tuple[list[jax.Array], ...]:
    """The copied leaves' layers in compute dtype (what the step carries as 'compute_copy')."""
    return tuple([p.astype(self.compute_dtype) for p in layers] for layers in self.copied_layers(layered_params))

  def with_copies(self, layered_params: Any, copies: tuple[list[jax.Array], ...]) -> Any:
    """`layered_params` with the copied leaves' layers replaced by their compute-dtype copies,
    widened back to the parameters' dtype. The model casts them to compute dtype again, and
    XLA folds the two casts away (a widening cast and back is exact); but their gradients
    come out in the parameters' dtype, as a cast's do, so that devices sum them in it, as
    with the stacked state (bf16 copies' gradients would be summed in bf16)."""
    parts, rest = self.treedef.flatten_up_to(layered_params), iter(copies)
    widen = lambda copy, layers: [c.astype(p.dtype) for c, p in zip(copy, layers)]  # noqa: E731
    return self.treedef.unflatten([widen(next(rest), p) if c else p for c, p in zip(self.copied, parts)])

  # -- the whole train state -------------------------------------------------------------

  def _over_params(self, state: dict[str, Any], treedef: Any, f) -> dict[str, Any]:
    """`state` with f applied to its params and to every subtree of its optimizer state shaped
    like them (Adam's moments)."""
    return {**state, "params": f(state["params"]), "opt_state": map_moments(f, state["opt_state"], treedef)}

  @functools.cached_property
  def layered_treedef(self) -> Any:
    return jax.tree.structure(self.expand(self.treedef.unflatten([0] * self.treedef.num_leaves)))

  def step_form(self, state: dict[str, Any]) -> dict[str, Any]:
    """The public train state in the step's form (traceable: for shapes and shardings)."""
    state = self._over_params(state, self.treedef, self.unstack)
    return {**state, COPY: self.copies(state["params"])}

  def step_shardings(self, public_shardings: dict[str, Any]) -> dict[str, Any]:
    """The step form's shardings: each layer as its stacked array is laid out, less the
    layers axis (which no device splits, see `build`)."""
    piece = lambda s: NamedSharding(s.mesh, P(*s.spec[1:]))
    state = self._over_params(public_shardings, self.treedef, lambda tree: self.expand(tree, piece))
    return {**state, COPY: self.copied_layers(state["params"])}

  def to_step(self, state: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
    """The public `state` in the step's form (`shardings`: `step_shardings`'), on the devices,
    leaf by leaf: each stacked array is deleted once its layers are made, so that no more than
    one leaf is held twice."""
    pieces = self.treedef.flatten_up_to(shardings["params"])

    def unstack(tree):
      leaves = self.treedef.flatten_up_to(tree)
      return self.treedef.unflatten([_unstack(a, self.num_layers, s[0]) if lay else a
                                     for lay, a, s in zip(self.layered, leaves, pieces)])

    layered = self._over_params(state, self.treedef, unstack)
    copies = tuple(_cast(tuple(p), self.compute_dtype, tuple(s))
                   for p, s in zip(self.copied_layers(layered["params"]), shardings[COPY]))
    return {**layered, COPY: copies}

  def to_public(self, state: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
    """The step-form `state` in the public form (`shardings`: the public state's), its compute
    copy dropped, leaf by leaf as `to_step`."""
    stacked = self.treedef.flatten_up_to(shardings["params"])  # the moments are laid out alike

    def restack(tree):
      parts = self.treedef.flatten_up_to(tree)
      return self.treedef.unflatten([_stack(tuple(p), s) if lay else p
                                     for lay, p, s in zip(self.layered, parts, stacked)])

    return self._over_params({k: v for k, v in state.items() if k != COPY}, self.layered_treedef, restack)


def _unstack(a: jax.Array, num_layers: int, piece: NamedSharding) -> list[jax.Array]:
  parts = _unstacker(num_layers, piece)(a)
  a.delete()
  return parts


def _stack(parts: tuple[jax.Array, ...], sharding: NamedSharding) -> jax.Array:
  stacked = _stacker(sharding)(parts)
  for p in parts:
    p.delete()
  return stacked


def _cast(parts: tuple[jax.Array, ...], dtype, shardings: tuple[NamedSharding, ...]) -> list[jax.Array]:
  return list(_caster(jnp.dtype(dtype), shardings)(parts))


@functools.lru_cache(maxsize=None)
def _unstacker(num_layers: int, piece: NamedSharding):
  return jax.jit(lambda a: [a[i] for i in range(num_layers)], out_shardings=[piece] * num_layers)


@functools.lru_cache(maxsize=None)
def _stacker(sharding: NamedSharding):
  return jax.jit(jnp.stack, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _caster(dtype, shardings: tuple[NamedSharding, ...]):
  return jax.jit(lambda parts: [p.astype(dtype) for p in parts], out_shardings=list(shardings))
