"""The sharding table of a config: where every parameter and activation lives on the mesh.

`explain_sharding(cfg)` resolves the rules against the mesh's axis sizes only: it builds the
model abstractly, creates no arrays and needs no devices, so a laptop can show the layout of a
256-device run (`paxlite shardings configs/bench-1.7b.yaml mesh.fsdp=256`). It uses the same
resolver and the same abstract model as the Trainer, and its per-device shapes are the shapes
of the shards the Trainer creates (tests/test_api.py checks them against real arrays).

Activations are found by tracing the forward pass abstractly and recording every
`paxlite.constrain` call the model makes, so a custom model's own constraints appear too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from paxlite.config import MESH_AXES, Config
from paxlite.mesh import dcn_sizes, mesh_sizes
from paxlite.models.build import ModelFn, ModelLayout, default_model_fn, is_spec, layout_model
from paxlite.partitioning import LogicalNames, format_rules, path_str, record_constraints, resolve, spec_axes
from paxlite.optimizer import make_optimizer, opt_state_like


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
  """One array: its logical names, the mesh axes they resolve to, its global and per-device shape."""

  name: str
  """Parameter path, e.g. 'blocks.attn.q.kernel'; 'tokens' or 'activation' for activations."""
  logical: LogicalNames
  spec: P
  mesh_axes: tuple[str, ...]
  """Per dimension, the mesh axes that split it ('data+fsdp'), '-' when none does; axes of
  size 1 are left out (they are in `spec`, but split nothing)."""
  shape: tuple[int, ...]
  local_shape: tuple[int, ...]
  dtype: str

  @property
  def bytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize

  @property
  def local_bytes(self) -> int:
    """Bytes of this array on each device holding a shard."""
    return math.prod(self.local_shape) * np.dtype(self.dtype).itemsize


def _array_layout(name: str, logical: Sequence[str | None], spec: P, shape: Sequence[int], dtype: Any,
                  mesh_shape: dict[str, int]) -> ArrayLayout:
  axes = spec_axes(spec, len(shape))
  local = tuple(d // math.prod(mesh_shape[a] for a in dim_axes) for d, dim_axes in zip(shape, axes))
  splitting = tuple("+".join(a for a in dim_axes if mesh_shape[a] > 1) or "-" for dim_axes in axes)
  return ArrayLayout(name, tuple(logical), spec, splitting, tuple(shape), local, np.dtype(dtype).name)


@dataclasses.dataclass(frozen=True)
class ShardingTable:
  """Every parameter's and the main activations' layout on one mesh; `print` it for a table."""

  mesh_shape: dict[str, int]
  rules: list[list[Any]]
  params: list[ArrayLayout]
  activations: list[ArrayLayout]
  """Input tokens, then each distinct constrained value of one forward pass of a micro-batch."""
  opt_state_bytes_per_device: int
  """AdamW state on each device: moments sharded like their parameters, counters replicated."""

  @property
  def num_params(self) -> int:
    return sum(math.prod(p.shape) for p in self.params)

  @property
  def param_bytes(self) -> int:
    return sum(p.bytes for p in self.params)

  @property
  def param_bytes_per_device(self) -> int:
    return sum(p.local_bytes for p in self.params)

  def param(self, name: str) -> ArrayLayout:
    """The row of the parameter at path `name`, e.g. 'blocks.attn.q.kernel'."""
    for row in self.params:
      if row.name == name:
        return row
    raise KeyError(f"no parameter '{name}' (have: {', '.join(p.name for p in self.params)})")

  def __str__(self) -> str:
    devices = math.prod(self.mesh_shape.values())
    mesh = " ".join(f"{a}={s}" for a, s in self.mesh_shape.items())
    per_device = self.param_bytes_per_device
    lines = [f"mesh {mesh} ({devices} device{'' if devices == 1 else 's'})", "", "rules:", format_rules(self.rules)]
    lines += ["", "parameters:"]
    lines += _render(self.params, with_name=True)
    lines += [
        "",
        f"parameters: {self.num_params:,} ({_size(self.param_bytes)}); per device {_size(per_device)}",
        f"optimizer state per device: {_size(self.opt_state_bytes_per_device)}; "
        f"parameters + optimizer state per device: {_size(per_device + self.opt_state_bytes_per_device)}",
        "",
        "activations and other constrained values (one micro-batch, in forward order):",
    ]
    lines += _render(self.activations, with_name=False)
    return "\n".join(lines)

  __repr__ = __str__


def _size(num_bytes: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if num_bytes < 1024 or unit == "TiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
    num_bytes /= 1024
  raise AssertionError("unreachable")


def _render(rows: list[ArrayLayout], with_name: bool) -> list[str]:
  header = ["logical axes", "mesh axes", "global shape", "per-device shape", "bytes/device", "dtype"]
  cells = [[", ".join(str(n or "-") for n in r.logical), ", ".join(r.mesh_axes), str(list(r.shape)),
            str(list(r.local_shape)), _size(r.local_bytes), r.dtype] for r in rows]
  if with_name:
    header = ["parameter"] + header
    cells = [[r.name] + c for r, c in zip(rows, cells)]
  widths = [max(len(x) for x in column) for column in zip(header, *cells)]
  fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
  return [fmt(header)] + [fmt(c) for c in cells]


def explain_sharding(cfg: Config, *, num_devices: int | None = None, model_fn: ModelFn | None = None) -> ShardingTable:
  """The layout of every parameter and the main activations of `cfg` under its rules and mesh.

  `num_devices` sizes a `-1` mesh axis; it defaults to the product of the mesh axes when none
  is -1, else to the devices jax sees. No arrays are created and no devices are needed.
  `model_fn` explains a custom model (see `Trainer(cfg, model_fn=...)`).

  >>> print(explain_sharding(load_config("configs/tiny.yaml", {"mesh.fsdp": 4}), num_devices=8))
  """
  sizes = [getattr(cfg.mesh, a) for a in MESH_AXES]
  if num_devices is None:
    granules = math.prod(dcn_sizes(cfg.mesh).values())
    num_devices = math.prod(sizes) * granules if -1 not in sizes else jax.device_count()
  mesh_shape = mesh_sizes(cfg.mesh, num_devices)
  model_fn = model_fn or default_model_fn(cfg)
  layout = layout_model(model_fn, cfg.rules, mesh_shape)

  flat_specs = jax.tree_util.tree_flatten_with_path(layout.specs, is_leaf=is_spec)[0]
  shapes = jax.tree.leaves(layout.shapes)
  names = jax.tree.leaves(layout.logical_names, is_leaf=lambda x: isinstance(x, tuple))
  params = [_array_layout(path_str(path), logical, spec, x.shape, x.dtype, mesh_shape)
            for (path, spec), x, logical in zip(flat_specs, shapes, names)]

  abstract_opt = jax.eval_shape(make_optimizer(cfg, layout.logical_names).init, layout.shapes)
  opt_specs = opt_state_like(abstract_opt, layout.shapes, layout.specs, P())
  opt_rows = jax.tree.leaves(jax.tree.map(
      lambda x, spec: _array_layout("", (None,) * x.ndim, spec, x.shape, x.dtype, mesh_shape),
      abstract_opt, opt_specs))

  return ShardingTable(
      mesh_shape=mesh_shape,
      rules=[list(r) for r in cfg.rules],
      params=params,
      activations=_activations(cfg, layout, mesh_shape),
      opt_state_bytes_per_device=sum(r.local_bytes for r in opt_rows),
  )


def _activations(cfg: Config, layout: ModelLayout, mesh_shape: dict[str, int]) -> list[ArrayLayout]:
  """Input tokens and every distinct (names, shape, dtype) the forward pass constrains."""
  micro_batch = cfg.train.batch_size // cfg.train.grad_accum
  tokens = jax.ShapeDtypeStruct((micro_batch, cfg.model.seq_len), jnp.int32)

  def forward(params, tokens_bt):
    return layout.merge(params)(tokens_bt)

  with record_constraints() as recorded:
    jax.eval_shape(forward, layout.shapes, tokens)
  seen, rows = set(), []
  for names, shape, dtype in [(("batch", "length"), tokens.shape, tokens.dtype)] + recorded:
    key = (names, shape, np.dtype(dtype).name)
    if key in seen:
      continue
    seen.add(key)
    what = (f"input tokens (train.batch_size / train.grad_accum = {micro_batch} sequences)" if not rows
            else f"activation {names}")
    spec = resolve(names, cfg.rules, shape=shape, mesh_shape=mesh_shape, what=what)
    rows.append(_array_layout("tokens" if not rows else "activation", names, spec, shape, dtype, mesh_shape))
  return rows
