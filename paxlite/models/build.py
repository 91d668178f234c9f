"""From a model function to parameters living in their shards: the one path every caller takes.

`layout_model` builds the model abstractly (no arrays) and resolves every parameter's logical
names under the rules; `init_params` runs the model function under `jax.jit` with those
shardings as `out_shardings`, so each device only ever holds its own slices. The Trainer,
`build_model` and `explain_sharding` all go through these two functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from paxlite.config import Config, ConfigError
from paxlite.mesh import make_mesh
from paxlite.models.transformer import Transformer
from paxlite.numerics import DtypePolicy, Fp8History, Fp8Seen
from paxlite.pipeline import Schedule
from paxlite.partitioning import Rules, axis_rules, flat_variables, nest, path_str, resolve, variable_names

ModelFn = Callable[[nnx.Rngs], nnx.Module]
"""Creates a model from its random streams; its parameters carry logical names
(nnx.with_partitioning) and calling it maps tokens [batch, length] to logits [batch, length, vocab]."""


def pipeline_schedule(cfg: Config) -> Schedule | None:
  """The pipeline schedule a config asks for, None without pipeline stages."""
  if cfg.mesh.stages <= 1:
    return None
  return Schedule(cfg.mesh.stages, cfg.pipeline.microbatches, cfg.pipeline.repeats)


def default_model_fn(cfg: Config) -> ModelFn:
  """paxlite's own Transformer as the `model`, `precision` and `pipeline` sections of `cfg` describe it."""
  policy = DtypePolicy.from_config(cfg.precision)
  schedule = pipeline_schedule(cfg)
  return lambda rngs: Transformer(cfg.model, policy, rngs=rngs, pipeline=schedule)


def no_eager_sharding():
  # Parameters are created under jit with explicit out_shardings from paxlite's own resolver;
  # NNX's eager sharding (its own resolver, no fallback rules) must stay out of the way.
  use = getattr(nnx, "use_eager_sharding", None)
  return use(False) if use is not None else contextlib.nullcontext()


def pure_dict(state: nnx.State) -> dict:
  """Nested dict of raw arrays: the form params take in optax, Orbax and jit."""
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State, nnx.State]:
  """(graph definition, parameters, fp8 amax histories, fp8 seen ports): every variable that
  is not fp8 state (paxlite.numerics) is a parameter the optimizer updates."""
  graphdef, fp8, seen, params = nnx.split(model, Fp8History, Fp8Seen, ...)
  return graphdef, params, fp8, seen


def param_layout(abstract_state: nnx.State, rules: Rules, mesh: Mesh | Mapping[str, int]) -> tuple[dict, dict]:
  """(PartitionSpecs, logical names) as pure dicts mirroring the parameter tree.

  `mesh` is a Mesh or just its axis sizes ({'data': 2, ...}): the layout needs no devices.
  Every array must name each of its dimensions; an unannotated one is an error, never
  silently replicated.
  """
  mesh_shape = dict(getattr(mesh, "shape", mesh))
  specs, names = [], []
  for path, var in flat_variables(abstract_state):
    shape = tuple(var.shape)
    what = f"parameter '{path_str(path)}' {shape}"
    logical = variable_names(var)
    if logical is None:
      if shape:
        raise ConfigError(f"{what}: has no logical axis names (create it with nnx.with_partitioning)")
      logical = ()
    specs.append((path, resolve(logical, rules, shape=shape, mesh_shape=mesh_shape, what=what)))
    names.append((path, logical))
  return nest(specs), nest(names)


def is_spec(x: Any) -> bool:
  return isinstance(x, P)


@dataclasses.dataclass(frozen=True)
class ModelLayout:
  """Where every parameter of a model lives, worked out without creating any array."""

  graphdef: Any
  """The NNX graph definition: `nnx.merge(graphdef, params)` rebuilds the module."""
  shapes: dict
  """jax.ShapeDtypeStruct of every parameter (a pure dict mirroring the module)."""
  specs: dict
  """PartitionSpec of every parameter under the rules."""
  logical_names: dict
  """Logical axis names of every parameter, e.g. ('layers', 'embed', 'heads', 'head_dim')."""
  fp8_shapes: dict = dataclasses.field(default_factory=dict)
  """Every Fp8History (delayed fp8 scaling; {} without): state, but not parameters."""
  fp8_specs: dict = dataclasses.field(default_factory=dict)
  seen_shapes: dict = dataclasses.field(default_factory=dict)
  """Every Fp8Seen port: zeros the model reads, whose gradients carry a step's fp8 amaxes."""
  seen_specs: dict = dataclasses.field(default_factory=dict)

  @property
  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.shapes))

  def shardings(self, mesh: Mesh, specs: dict | None = None) -> dict:
    """NamedShardings of the parameters (or of `specs`, e.g. `fp8_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), self.specs if specs is None else specs, is_leaf=is_spec)

  def merge(self, params: Any, fp8: Any | None = None, seen: Any | None = None) -> nnx.Module:
    """The module holding `params`; fp8 histories and seen ports default to zeros (no amax
    seen yet: delayed scaling starts from scale 1)."""
    zeros = lambda shapes: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    fp8 = zeros(self.fp8_shapes) if fp8 is None else fp8
    seen = zeros(self.seen_shapes) if seen is None else seen
    return nnx.merge(self.graphdef, params, fp8, seen)


def layout_model(model_fn: ModelFn, rules: Rules, mesh: Mesh | Mapping[str, int]) -> ModelLayout:
  """Builds the model abstractly (nnx.eval_shape) and resolves its parameters' shardings."""
  with no_eager_sharding():
    abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
  graphdef, abstract_params, abstract_fp8, abstract_seen = split_model(abstract_model)
  specs, names = param_layout(abstract_params, rules, mesh)
  return ModelLayout(graphdef=graphdef, shapes=pure_dict(abstract_params), specs=specs, logical_names=names,
                     fp8_shapes=pure_dict(abstract_fp8), fp8_specs=param_layout(abstract_fp8, rules, mesh)[0],
                     seen_shapes=pure_dict(abstract_seen), seen_specs=param_layout(abstract_seen, rules, mesh)[0])


def init_params(model_fn: ModelFn, layout: ModelLayout, mesh: Mesh, rules: Rules, seed: int) -> dict:
  """Runs `model_fn` under jit with the layout's shardings as out_shardings: each device
  computes and keeps only its own slices, so the whole model never sits on one device."""

  def create():
    with no_eager_sharding():
      model = model_fn(nnx.Rngs(seed))
    return pure_dict(split_model(model)[1])

  with jax.set_mesh(mesh), axis_rules(rules):
    return jax.jit(create, out_shardings=layout.shardings(mesh))()


def build_model(cfg: Config, mesh: Mesh | None = None, *, model_fn: ModelFn | None = None) -> nnx.Module:
  """Creates the model of `cfg` (or `model_fn`'s) already sharded over `mesh` by `cfg.rules`.

  The parameters are the ones a Trainer with the same config and seed starts from.
  `mesh` defaults to `make_mesh(cfg)` over all devices.

  >>> model = build_model(cfg, make_mesh(cfg))
  >>> logits_btv = model(tokens_bt)
  """
  mesh = make_mesh(cfg) if mesh is None else mesh
  model_fn = model_fn or default_model_fn(cfg)
  layout = layout_model(model_fn, cfg.rules, mesh)
  return layout.merge(init_params(model_fn, layout, mesh, cfg.rules, cfg.run.seed))
