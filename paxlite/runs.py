"""A finished (or running) run directory -> a model with its trained parameters.

`load_run` is what sampling, evaluation and export start from: it reads run_dir/config.yaml,
builds a mesh over this process's devices, and restores only the parameters of a checkpoint
(Orbax partial restore: the optimizer state, twice the parameters' size under Adam, is never
read), directly into their shards.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from paxlite.checkpoint import Checkpointer, abstract_like, flat_shapes
from paxlite.config import Config, ConfigError, apply_overrides, config_from_dict, read_yaml, validate
from paxlite.mesh import make_mesh
from paxlite.models.build import default_model_fn, layout_model
from paxlite.models.transformer import Transformer

# Inference defaults to plain data parallelism over the local devices, whatever mesh the run
# trained on; `mesh.*` overrides choose another (e.g. mesh.data=1 mesh.tensor=8 for a model
# too large for one device).
_INFERENCE_MESH = {"mesh.data": -1, "mesh.fsdp": 1, "mesh.stage": 1, "mesh.tensor": 1, "mesh.dcn_data": 1,
                   "mesh.dcn_fsdp": 1, "mesh.dcn_stage": 1}


def run_config(run_dir: str, overrides: dict[str, Any] | list[str] | None = None) -> Config:
  """run_dir/config.yaml with run.dir set to `run_dir`, the inference mesh, then `overrides`."""
  if not os.path.isdir(run_dir):
    raise ConfigError(f"run directory '{run_dir}' not found")
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(path):
    raise ConfigError(f"run directory '{run_dir}' holds no config.yaml (not a paxlite run directory)")
  data = apply_overrides(read_yaml(path), {**_INFERENCE_MESH, "run.dir": run_dir})
  cfg = config_from_dict(apply_overrides(data, overrides or {}))
  validate(cfg)
  return cfg


def checkpoint_step(run_dir: str, cfg: Config, step: int | None) -> tuple[Checkpointer, int]:
  """The run's checkpointer and the step to read: `step`, or the latest one."""
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    raise ConfigError(f"run directory '{run_dir}' holds no checkpoints/ (train it first)")
  checkpointer = Checkpointer(run_dir, cfg.checkpoint)
  steps = checkpointer.all_steps()
  if step is None and steps:
    return checkpointer, max(steps)
  if step in steps:
    return checkpointer, step
  checkpointer.close()
  if not steps:
    raise ConfigError(f"run directory '{run_dir}': checkpoints/ holds no finished checkpoint")
  raise ConfigError(f"--step: run directory '{run_dir}' has no checkpoint {step} (it has {sorted(steps)})")


def _check_shapes(stored: dict[str, tuple[int, ...]], shapes: dict, what: str) -> None:
  expected = flat_shapes(shapes)
  for name in sorted(stored.keys() | expected.keys()):
    if stored.get(name) != expected.get(name):
      raise ConfigError(f"{what} does not match the config: parameter '{name}' is {stored.get(name, 'absent')} there, "
                        f"{expected.get(name, 'absent')} with this config (were model.* keys overridden?)")


def load_run(run_dir: str, *, step: int | None = None,
             overrides: dict[str, Any] | list[str] | None = None) -> tuple[Transformer, Config]:
  """The model of `run_dir` with the parameters of checkpoint `step` (default: the latest).

  Returns (model, cfg): `model(tokens_bt)` gives float32 logits; its parameters are sharded on
  a mesh over this process's devices by the run's rules table. The mesh is data-parallel over
  all local devices unless `overrides` (dotted keys, as on the command line) set `mesh.*`;
  they may change any other key too, e.g. {"precision.compute": "float32"}.

  >>> model, cfg = load_run("runs/tiny")
  >>> logits = model(jnp.asarray([[72, 105]]))
  """
  cfg = run_config(run_dir, overrides)
  mesh = make_mesh(cfg, jax.local_devices())
  layout = layout_model(default_model_fn(cfg), cfg.rules, mesh)
  checkpointer, step = checkpoint_step(run_dir, cfg, step)
  try:
    # Checked up front: a failed Orbax restore leaves background tasks that print tracebacks at exit.
    _check_shapes(checkpointer.stored_param_shapes(step), layout.shapes,
                  f"run directory '{run_dir}': checkpoint {step}")
    abstract = {"params": abstract_like(layout.shapes, layout.shardings(mesh))}
    if layout.fp8_shapes:  # delayed fp8 scaling: the run's amax histories set its scales
      abstract["fp8"] = abstract_like(layout.fp8_shapes, layout.shardings(mesh, layout.fp8_specs))
    restored = checkpointer.restore_items(step, abstract)
  finally:
    checkpointer.close()
  return layout.merge(restored["params"], restored.get("fp8")), cfg
