"""The rules table: logical axis names -> mesh axes -> PartitionSpec / NamedSharding.

Models name their dimensions ('batch', 'embed', 'heads', ...); this file alone decides how
those names land on the device mesh. A rule is `(logical_name, mesh_axes)` where mesh_axes
is one mesh axis, a list of them, or None (replicated). For each dimension of an array the
first rule for its name whose mesh axes are not already used by another dimension of that
same array wins, so a repeated name is a fallback (T5X / MaxText semantics). A name with no
usable rule, or a dimension its mesh axes do not divide, is an error naming the array.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from paxlite.config import ConfigError

Rules = Sequence[Sequence[Any]]
LogicalNames = tuple[str | None, ...]

_RULES: contextvars.ContextVar[tuple[tuple[str, tuple[str, ...] | None], ...] | None] = (
    contextvars.ContextVar("paxlite_axis_rules", default=None)
)
# While set (by `record_constraints`), every `constrain` call appends (names, shape, dtype).
_RECORDED: contextvars.ContextVar[list[tuple[LogicalNames, tuple[int, ...], Any]] | None] = (
    contextvars.ContextVar("paxlite_recorded_constraints", default=None)
)


def normalize_rules(rules: Rules) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
  """[[name, axis | [axes] | None], ...] -> ((name, (axes...) | None), ...)."""
  out = []
  for name, axes in rules:
    if axes is None:
      out.append((name, None))
    elif isinstance(axes, str):
      out.append((name, (axes,)))
    else:
      out.append((name, tuple(axes) or None))
  return tuple(out)


def resolve(
    names: Sequence[str | None],
    rules: Rules,
    *,
    shape: Sequence[int] | None = None,
    mesh_shape: dict[str, int] | None = None,
    what: str = "array",
) -> P:
  """Maps one array's logical names to a PartitionSpec under the ordered rules.

  `names[i] is None` leaves dimension i replicated. With `shape` and `mesh_shape`, also checks
  that every sharded dimension divides by the product of its mesh axes.
  """
  table = normalize_rules(rules)
  if shape is not None and len(shape) != len(names):
    raise ConfigError(
        f"{what}: {len(names)} logical names {tuple(names)} for an array of rank {len(shape)} {tuple(shape)}"
    )
  used: set[str] = set()
  spec: list[str | tuple[str, ...] | None] = []
  for dim, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    candidates = [axes for rule_name, axes in table if rule_name == name]
    if not candidates:
      raise ConfigError(f"{what}: no partition rule for logical axis '{name}' (add it to `rules`)")
    chosen = next((axes for axes in candidates if axes is None or not used.intersection(axes)), False)
    if chosen is False:
      raise ConfigError(
          f"{what}: every rule for logical axis '{name}' uses a mesh axis already taken by another "
          f"dimension of this array (names {tuple(names)}); add a fallback rule such as ['{name}', null]"
      )
    if chosen is None:
      spec.append(None)
      continue
    used.update(chosen)
    if shape is not None and mesh_shape is not None:
      ways = math.prod(mesh_shape[a] for a in chosen)
      if shape[dim] % ways:
        raise ConfigError(
            f"{what}: dimension {dim} ('{name}', size {shape[dim]}) is not divisible by mesh axes "
            f"{' x '.join(chosen)} of size {ways}"
        )
    spec.append(chosen[0] if len(chosen) == 1 else chosen)
  return P(*spec)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Makes `rules` the table `constrain` resolves activation names with (trace time)."""
  token = _RULES.set(normalize_rules(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> tuple[tuple[str, tuple[str, ...] | None], ...] | None:
  return _RULES.get()


def mesh_shape(mesh: Any) -> dict[str, int]:
  """{axis name: size} of a (possibly abstract) mesh."""
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def activation_spec(names: LogicalNames, shape: Sequence[int]) -> P | None:
  """The PartitionSpec the current rules give an activation of `shape` named `names` on the
  current (trace-time) mesh; None with no mesh or no rules set."""
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return None
  return resolve(names, rules, shape=shape, mesh_shape=mesh_shape(mesh), what=f"activation {tuple(names)}")


def activation_split(names: LogicalNames, shape: Sequence[int]) -> tuple[list[tuple[str, ...]], tuple[int, ...]]:
  """Each dimension's mesh axes under the current rules for an activation of `shape` named
  `names` on the current mesh, and how many ways they split it (no axes and 1 with no mesh or
  no rules). Axes of size 1 split nothing, though the PartitionSpec still names them."""
  spec = activation_spec(names, shape)
  if spec is None:
    return [()] * len(shape), (1,) * len(shape)
  return spec_axes(spec, len(shape)), split_ways(spec, len(shape), mesh_shape(jax.sharding.get_abstract_mesh()))


def spec_axes(spec: P, rank: int) -> list[tuple[str, ...]]:
  """The mesh axes of each of `rank` dimensions under `spec` (() for replicated)."""
  entries = list(spec) + [None] * (rank - len(spec))
  return [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in entries]


def split_ways(spec: P, rank: int, sizes: dict[str, int]) -> tuple[int, ...]:
  """How many ways `spec` splits each of `rank` dimensions on a mesh of axis `sizes`."""
  return tuple(math.prod(sizes[a] for a in axes) for axes in spec_axes(spec, rank))


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op with no mesh or rules set.

  Called at block boundaries so that the rules, not XLA's propagation guesses, decide the
  layout of activations (batch over data/fsdp, heads and mlp over tensor, ...).
  """
  recorded = _RECORDED.get()
  if recorded is not None:
    recorded.append((tuple(names), tuple(x.shape), x.dtype))
  spec = activation_spec(names, x.shape)
  if spec is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(jax.sharding.get_abstract_mesh(), spec))


@contextlib.contextmanager
def record_constraints() -> Iterator[list[tuple[LogicalNames, tuple[int, ...], Any]]]:
  """Collects (logical names, shape, dtype) of every `constrain` call traced inside the block.

  This is how `paxlite shardings` learns a model's activation layout: it traces the forward
  pass abstractly and reads back what the model itself constrained, custom models included.
  """
  token = _RECORDED.set([])
  try:
    yield _RECORDED.get()
  finally:
    _RECORDED.reset(token)


# ---------------------------------------------------------------------------------------
# Parameters: logical names from NNX metadata -> specs / shardings for a whole state tree.
# ---------------------------------------------------------------------------------------


def variable_names(variable: Any) -> LogicalNames | None:
  """Logical axis names stored on an nnx.Variable by nnx.with_partitioning (or None)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    names = meta.get(key)
    if names:
      return tuple(names)
  return None


def path_str(path: Sequence[Any]) -> str:
  parts = []
  for p in path:
    key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
    parts.append(str(key))
  return ".".join(parts)


def flat_variables(state: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """(path, nnx.Variable) for every variable of an nnx.State, across Flax's API versions."""
  from flax import nnx

  flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
  return [(tuple(path), var) for path, var in flat]


def nest(flat: Sequence[tuple[tuple[Any, ...], Any]]) -> dict:
  """[(path, value), ...] -> a nested dict keyed by the path's parts."""
  out: dict = {}
  for path, value in flat:
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def format_rules(rules: Rules) -> str:
  """The table as aligned text, for logs and `paxlite shardings`."""
  table = normalize_rules(rules)
  width = max((len(n) for n, _ in table), default=0)
  lines = []
  for name, axes in table:
    lines.append(f"{name:<{width}}  ->  {'replicated' if axes is None else ' x '.join(axes)}")
  return "\n".join(lines)
