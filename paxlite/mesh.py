"""Devices -> a named `Mesh` with axes (data, fsdp, stage, tensor), in that order.

The order puts `tensor` last so that its devices are neighbours in jax's device order (the
fastest links), `data` first so that the slowest axis carries the least traffic.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from paxlite.config import MESH_AXES, Config, ConfigError, MeshConfig


def mesh_sizes(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolves the one -1 axis (if any) and checks the product equals the device count."""
  sizes = {axis: getattr(mesh_cfg, axis) for axis in MESH_AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  free = [axis for axis, s in sizes.items() if s == -1]
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh.{free[0]}: -1 cannot fill the mesh: the other axes multiply to {fixed}, "
          f"which does not divide the {num_devices} devices"
      )
    sizes[free[0]] = num_devices // fixed
  product = math.prod(sizes.values())
  if product != num_devices:
    shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
    raise ConfigError(f"mesh: {shown} makes {product} devices, but there are {num_devices} devices")
  return sizes


def make_mesh(cfg: Config | MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the 4-axis mesh of `cfg` (a whole Config or its `mesh` section) over `devices`
  (default: all devices), with Auto axis types.

  Auto axes let the rules table act through sharding constraints while XLA propagates the
  rest; jax.make_mesh would default to Explicit axes, which this design does not use.
  """
  mesh_cfg = cfg.mesh if isinstance(cfg, Config) else cfg
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    # Lays the axes onto the physical topology (ICI rings on TPU, NVLink islands on GPU).
    from jax.experimental import mesh_utils

    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - topology-unaware fallback (e.g. CPU, odd device counts)
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
  """One line: 'mesh data=2 fsdp=2 stage=1 tensor=2 over 8 cpu devices'."""
  axes = " ".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes))
  kind = mesh.devices.flat[0].platform
  return f"mesh {axes} over {mesh.devices.size} {kind} devices"
