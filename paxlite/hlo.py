"""The collectives of a compiled step, read from its optimized HLO text.

For every all-reduce, all-gather, reduce-scatter, collective-permute and all-to-all: its kind,
the mesh axes its device groups span (found by mapping the replica groups, in any of XLA's three
printed forms, onto the mesh's coordinates), the bytes of its result on each device, and how
many times it runs per step. A collective inside a `while` body (the scan over layers, the
pipeline loop, gradient accumulation) runs trip-count times: the loop's known trip count is
read from its backend_config, and nested loops multiply. Collectives in both branches of a
conditional are each counted once (an over-count; paxlite's steps have no such branches).

Wire bytes are what one device sends with ring algorithms: all-reduce 2 (g-1)/g x size,
all-gather and all-to-all (g-1)/g x result, reduce-scatter (g-1)/g x input, collective-permute
the whole buffer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_CALLEES = re.compile(r"(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_REPLICA_GROUPS = re.compile(  # explicit {{..}} | {} | iota [G,S]<=[dims]T(perm) | mesh[...] {axes}
    r"replica_groups=(\{\{[\d,{}]*\}\}|\{\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?|mesh\[.*?\}(?=[,\s]))")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One kind of collective over one set of mesh axes, summed over a step."""

  kind: str
  axes: tuple[str, ...]
  """Mesh axes the device groups span; ('?',) when the groups could not be read."""
  group_size: int
  count: int
  """Executions per step (loop trip counts included)."""
  bytes: int
  """Result bytes per device, summed over the executions (reduce-scatter: input bytes)."""

  @property
  def wire_bytes(self) -> float:
    """Bytes each device sends per step with ring algorithms."""
    g = self.group_size
    if self.kind == "collective-permute":
      return float(self.bytes)
    share = (g - 1) / g if g > 1 else 0.0
    return (2 * share if self.kind == "all-reduce" else share) * self.bytes


def _array_bytes(type_text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _DTYPE_BYTES:
      out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return out


def _result_bytes(kind: str, is_start: bool, type_text: str) -> int:
  sizes = _array_bytes(type_text)
  if not sizes:
    return 0
  if is_start and kind in ("all-gather", "collective-permute") and len(sizes) >= 2:
    # Async starts return (operands, results[, contexts]): the results are the second half
    # of the buffers (collective-permute: the second buffer).
    return sizes[1] if kind == "collective-permute" else sum(sizes[len(sizes) // 2:])
  return sum(sizes)


def _ints(text: str) -> list[int]:
  return [int(x) for x in re.findall(r"-?\d+", text)]


def _iota(dims: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
  array = np.arange(math.prod(dims)).reshape(dims)
  return (array.transpose(perm) if perm else array).reshape(-1)


def _parse_iota(text: str) -> np.ndarray | None:
  """'[G,S]<=[d0,d1]T(1,0)' -> groups [G, S]."""
  m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if not m:
    return None
  shape = _ints(m.group(1))
  return _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None).reshape(shape)


def _parse_mesh_groups(text: str) -> np.ndarray | None:
  """"mesh['a'=8,'b'=2], device_ids=([4,4]T(1,0)) {'a'}" -> groups [G, S] (XLA's
  MeshAxesReplicaGroupList: reshape the device list to the mesh, move the grouped axes last)."""
  m = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", text)
  if not m:
    return None
  axes = re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))
  names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
  total = math.prod(sizes)
  ids_text = (m.group(2) or "").strip()
  if not ids_text:
    devices = np.arange(total)
  elif ids_text.startswith("["):
    dm = re.match(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", ids_text)
    devices = _iota(_ints(dm.group(1)), _ints(dm.group(2)) if dm.group(2) else None)
  else:
    devices = np.asarray(_ints(ids_text))
  dims: list[int] = []
  grouped: list[int] = []
  refs = re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", m.group(3))
  by_axis = {name: (int(pre), int(size)) for name, pre, size in refs if pre}
  whole = {name for name, pre, _ in refs if not pre}
  for name, size in zip(names, sizes):
    if name in by_axis:  # a sub-axis 'a':(pre)size splits axis a into [pre, size, rest]
      pre, sub = by_axis[name]
      grouped.append(len(dims) + 1)
      dims += [pre, sub, size // (pre * sub)]
    else:
      if name in whole:
        grouped.append(len(dims))
      dims.append(size)
  if math.prod(dims) != devices.size or not grouped:
    return None
  order = [i for i in range(len(dims)) if i not in grouped] + grouped
  group_size = math.prod(dims[i] for i in grouped)
  return devices.reshape(dims).transpose(order).reshape(-1, group_size)


def _groups(line: str, num_devices: int) -> np.ndarray | None:
  """The device groups of one collective, [G, S] logical device ids (None: unreadable)."""
  pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
  if pairs:
    return np.asarray(_ints(pairs.group(1))).reshape(-1, 2) if pairs.group(1) else None
  m = _REPLICA_GROUPS.search(line)
  if not m:
    return np.arange(num_devices)[None, :]
  text = m.group(1)
  if text == "{}":
    return np.arange(num_devices)[None, :]
  if text.startswith("{{"):
    groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", text[1:-1])]
    return np.asarray(groups) if len({len(g) for g in groups}) == 1 else None
  return _parse_iota(text) if text.startswith("[") else _parse_mesh_groups(text)


def _axes(groups: np.ndarray | None, mesh_shape: dict[str, int]) -> tuple[tuple[str, ...], int]:
  """Mesh axes along which the members of the groups differ, and the group size."""
  if groups is None:
    return ("?",), 0
  names, sizes = list(mesh_shape), list(mesh_shape.values())
  if groups.max(initial=0) >= math.prod(sizes):
    return ("?",), groups.shape[1]
  coords = np.stack(np.unravel_index(groups, sizes), axis=-1)  # [G, S, axes]
  varies = (coords != coords[:, :1]).any(axis=(0, 1))
  return tuple(n for n, v in zip(names, varies) if v) or ("-",), groups.shape[1]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
    elif line.strip() == "}":
      current = None
    else:
      comps[current].append(line)
  return comps, entry


def _multipliers(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per execution of the entry computation."""
  calls: dict[str, list[tuple[str, int]]] = {name: [] for name in comps}
  for name, lines in comps.items():
    for line in lines:
      trip = _TRIP.search(line)
      factor = int(trip.group(1)) if trip and " while(" in line else 1
      callees = _CALLEES.findall(line)
      for branch in _BRANCHES.findall(line):
        callees += re.findall(r"%?([\w.\-]+)", branch)
      for callee in callees:
        if callee in calls:
          calls[name].append((callee, factor))
  mult: dict[str, int] = {}

  def visit(name: str, times: int) -> None:
    mult[name] = mult.get(name, 0) + times
    for callee, factor in calls[name]:
      visit(callee, times * factor)

  visit(entry, 1)
  return mult


def collectives(hlo: str, mesh_shape: dict[str, int]) -> list[Collective]:
  """Every collective of the optimized HLO `hlo` (compiled.as_text()), summed per (kind, axes).

  `mesh_shape` is the mesh's axis sizes in order; logical device i of the compiled program is
  the i-th device of the mesh in row-major order.
  """
  comps, entry = _computations(hlo)
  if entry is None:
    return []
  mult = _multipliers(comps, entry)
  num_devices = math.prod(mesh_shape.values())
  totals: dict[tuple[str, tuple[str, ...]], list[int]] = {}
  for name, lines in comps.items():
    times = mult.get(name, 0)
    if not times:
      continue
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      type_text, kind, is_start = m.group(2), m.group(3), bool(m.group(4))
      size = _result_bytes(kind, is_start, type_text)
      axes, group = _axes(_groups(line, num_devices), mesh_shape)
      if kind == "reduce-scatter":
        size *= max(group, 1)
      total = totals.setdefault((kind, axes), [0, 0, group])
      total[0] += times
      total[1] += times * size
  order = lambda item: (KINDS.index(item[0][0]), item[0][1])
  return [Collective(kind, axes, group, count, size)
          for (kind, axes), (count, size, group) in sorted(totals.items(), key=order)]
