"""Devices -> a named `Mesh` with axes (data, fsdp, stage, tensor); joining a multi-process run.

The order puts `tensor` last so that its devices are neighbours in jax's device order (the
fastest links), `data` first so that the slowest axis carries the least traffic. With
`mesh.dcn_<axis>` > 1 the mesh is hybrid: the devices are grouped into slices or hosts
("granules"), each granule holds an ICI mesh of shape (data, fsdp, stage, tensor), and the
granules are laid out as a (dcn_data, dcn_fsdp, dcn_stage, 1) grid, DCN-major on each axis, so
the traffic-heavy axes never leave a slice or host (jax's `create_hybrid_device_mesh`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from paxlite import xla_flags
from paxlite.config import DCN_AXES, MESH_AXES, Config, ConfigError, DistributedConfig, MeshConfig


def dcn_sizes(mesh_cfg: MeshConfig) -> dict[str, int]:
  """How many slices or hosts each mesh axis spans (1 for tensor, which never leaves one)."""
  return {axis: getattr(mesh_cfg, f"dcn_{axis}") if axis in DCN_AXES else 1 for axis in MESH_AXES}


def ici_sizes(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """The axis sizes inside one slice or host: resolves the one -1 axis (if any) and checks the
  product equals the devices per granule (all devices when no dcn axis is > 1)."""
  granules = math.prod(dcn_sizes(mesh_cfg).values())
  if num_devices % granules:
    raise ConfigError(f"mesh.dcn_*: {granules} slices or hosts (the product of the dcn axes) do not divide "
                      f"the {num_devices} devices")
  per_granule = num_devices // granules
  where = f"{per_granule} devices in each of {granules} slices or hosts" if granules > 1 else f"{num_devices} devices"
  sizes = {axis: getattr(mesh_cfg, axis) for axis in MESH_AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  free = [axis for axis, s in sizes.items() if s == -1]
  if free:
    if per_granule % fixed:
      raise ConfigError(
          f"mesh.{free[0]}: -1 cannot fill the mesh: the other axes multiply to {fixed}, "
          f"which does not divide the {where}"
      )
    sizes[free[0]] = per_granule // fixed
  product = math.prod(sizes.values())
  if product != per_granule:
    shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
    raise ConfigError(f"mesh: {shown} makes {product} devices, but there are {where}")
  return sizes


def mesh_sizes(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """The mesh's axis sizes over `num_devices` devices: ICI size x DCN size on each axis."""
  dcn = dcn_sizes(mesh_cfg)
  return {axis: size * dcn[axis] for axis, size in ici_sizes(mesh_cfg, num_devices).items()}


def _ici_array(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  try:
    # Lays the axes onto the physical topology (ICI rings on TPU, NVLink islands on GPU).
    from jax.experimental import mesh_utils

    return mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - topology-unaware fallback (e.g. CPU, odd device counts)
    return np.asarray(devices, dtype=object).reshape(shape)


def granules(devices: Sequence[Any], count: int) -> list[list[Any]]:
  """`devices` split into `count` equal slices or hosts, in order.

  By slice (TPU multislice: devices carry `slice_index`) when there are `count` slices or a
  multiple of it; else by process (a multiple of `count` processes: consecutive process ranks
  share a granule, as launchers number the processes of one host consecutively); else, in a
  single process, consecutive blocks in device order (one host simulating several).
  """
  def grouped(key) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = {}
    for device in devices:
      out.setdefault(key(device), []).append(device)
    return out

  for key in (lambda d: getattr(d, "slice_index", None), lambda d: d.process_index):
    groups = grouped(key)
    if None in groups or len(groups) < 2 or len(groups) % count:
      continue
    keys = sorted(groups)
    per = len(keys) // count
    out = [sum((groups[k] for k in keys[g * per:(g + 1) * per]), []) for g in range(count)]
    if len({len(g) for g in out}) == 1:
      return out
  if len({d.process_index for d in devices}) == 1 and len(devices) % count == 0:
    ordered = sorted(devices, key=lambda d: d.id)
    per = len(ordered) // count
    return [ordered[g * per:(g + 1) * per] for g in range(count)]
  slices = len({getattr(d, "slice_index", None) for d in devices})
  processes = len({d.process_index for d in devices})
  raise ConfigError(f"mesh.dcn_*: {count} slices or hosts asked for, but the {len(devices)} devices span "
                    f"{slices} slice(s) and {processes} process(es) that do not group into {count} equal parts")


def device_array(mesh_cfg: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as the mesh (data, fsdp, stage, tensor) asks, hybrid when a dcn axis > 1."""
  ici = ici_sizes(mesh_cfg, len(devices))
  dcn = dcn_sizes(mesh_cfg)
  ici_shape = tuple(ici[a] for a in MESH_AXES)
  dcn_shape = tuple(dcn[a] for a in MESH_AXES)
  count = math.prod(dcn_shape)
  if count == 1:
    return _ici_array(ici_shape, devices)
  parts = granules(devices, count)
  # What jax's mesh_utils.create_hybrid_device_mesh does, with granules that may hold several
  # processes (one process per GPU) or none of their own (a single-process simulation).
  blocks = np.empty(dcn_shape, dtype=object)
  for index, part in enumerate(parts):
    blocks[np.unravel_index(index, dcn_shape)] = _ici_array(ici_shape, part)
  return np.block(blocks.tolist())


def make_mesh(cfg: Config | MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the 4-axis mesh of `cfg` (a whole Config or its `mesh` section) over `devices`
  (default: all devices of all processes), with Auto axis types.

  Auto axes let the rules table act through sharding constraints while XLA propagates the
  rest; jax.make_mesh would default to Explicit axes, which this design does not use.
  """
  mesh_cfg = cfg.mesh if isinstance(cfg, Config) else cfg
  if devices is None:
    xla_flags.apply_defaults()  # before jax.devices() may initialise the backend
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_array(mesh_cfg, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
  """One line: 'mesh data=2 fsdp=2 stage=1 tensor=2 over 8 cpu devices' (+ 'in 2 processes')."""
  axes = " ".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes))
  kind = mesh.devices.flat[0].platform
  processes = len({d.process_index for d in mesh.devices.flat})
  where = f" in {processes} processes" if processes > 1 else ""
  return f"mesh {axes} over {mesh.devices.size} {kind} devices{where}"


# ---------------------------------------------------------------------------------------
# Multi-process runs: jax's own distributed runtime (XLA collectives over NCCL, ICI, DCN;
# gloo on CPU), never a home-made one.
# ---------------------------------------------------------------------------------------


def detected_launcher() -> str | None:
  """The cluster launcher jax.distributed can configure itself from (slurm, ompi, gke_tpu, ...)
  when it runs more than one process; None otherwise (a plain single-process run).

  Asked before calling jax.distributed.initialize(), because without any launcher that call
  fails, and on a one-task launcher it would open a coordination service for nothing.
  """
  try:
    from jax._src import clusters  # jax's detectors: private, so guarded
  except ImportError:
    return None
  for env in clusters.ClusterEnv._cluster_types:
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present() and env.get_process_count() > 1:
        return env.name or env.__name__
    except Exception:  # noqa: BLE001 - a half-configured environment is not a launcher
      continue
  return None


def _env_int(name: str) -> int | None:
  raw = os.environ.get(name)
  if raw is None or raw == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise ConfigError(f"${name}: expected an integer, got {raw!r}") from None


def distributed_settings(cfg: DistributedConfig) -> tuple[str | None, int | None, int | None]:
  """(coordinator, num_processes, process_id): the config's values, else $JAX_COORDINATOR_ADDRESS,
  $JAX_NUM_PROCESSES, $JAX_PROCESS_ID."""
  coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num = cfg.num_processes if cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
  return coordinator, num, pid


def initialize_distributed(cfg: DistributedConfig) -> bool:
  """Joins a multi-process run when one is configured (config or environment) or launched
  (SLURM, Open MPI, Cloud TPU, GKE); returns whether this is a multi-process run.

  Must run before anything initialises a jax backend (the CLI calls it first). On CPU the
  processes exchange collectives over gloo (TCP).
  """
  coordinator, num, pid = distributed_settings(cfg)
  launcher = detected_launcher()
  if launcher is None:
    given = {"coordinator": coordinator, "num_processes": num, "process_id": pid}
    if all(v is None for v in given.values()) or num == 1:
      return False
    missing = [f"distributed.{k}" for k, v in given.items() if v is None]
    if missing:
      raise ConfigError(f"{', '.join(missing)}: needed for a multi-process run (no cluster launcher detected); "
                        f"set all of distributed.coordinator, num_processes and process_id")
    if not 0 <= pid < num:
      raise ConfigError(f"distributed.process_id: {pid} is not in 0 .. {num - 1}")
  if jax.distributed.is_initialized():
    return True
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num, pid, initialization_timeout=cfg.timeout_s)
  except (RuntimeError, ValueError) as e:  # jax's XlaRuntimeError is a RuntimeError
    where = coordinator or f"the {launcher} launcher's coordinator"
    message = " ".join(str(e).split())[:300]
    raise ConfigError(f"distributed.coordinator: could not join the run at {where}: {message}") from None
  return True
