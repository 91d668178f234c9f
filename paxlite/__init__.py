"""paxlite's Python API: the same framework the `paxlite` command drives, from Python.

>>> import paxlite
>>> cfg = paxlite.load_config("configs/tiny.yaml", overrides={"mesh.fsdp": 4})
>>> print(paxlite.explain_sharding(cfg))        # every parameter's and activation's layout
>>> mesh = paxlite.make_mesh(cfg)
>>> model = paxlite.build_model(cfg, mesh)      # created directly in its shards
>>> trainer = paxlite.Trainer(cfg)
>>> history = trainer.train(steps=100)          # or: for record in trainer.train_iter(steps=100)
>>> trainer.evaluate()
>>> model, cfg = paxlite.load("runs/tiny")       # a trained run's model (latest checkpoint)
>>> paxlite.generate(model, [[100, 101, 102]], max_new_tokens=20, rules=cfg.rules)
>>> [plan] = paxlite.make_plan(cfg, 64)            # will it fit on 64 GPUs? (compiled on CPU stand-ins)

Names are imported on first use, so `import paxlite` (and the `paxlite` command's config
checks) do not import jax: set XLA_FLAGS or JAX_PLATFORMS before touching a jax-backed name.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> "module" defining it under that name, or "module:name" when it differs
_EXPORTS = {
    "ConfigError": "paxlite.config",
    "CheckpointError": "paxlite.checkpoint",
    "NonFiniteError": "paxlite.faults",
    "Config": "paxlite.config",
    "ModelConfig": "paxlite.config",
    "MeshConfig": "paxlite.config",
    "PrecisionConfig": "paxlite.config",
    "TrainConfig": "paxlite.config",
    "DataConfig": "paxlite.config",
    "EvalConfig": "paxlite.config",
    "CheckpointConfig": "paxlite.config",
    "RunConfig": "paxlite.config",
    "DEFAULT_RULES": "paxlite.config",
    "load_config": "paxlite.config",
    "describe_keys": "paxlite.config",
    "constrain": "paxlite.partitioning",
    "resolve": "paxlite.partitioning",
    "axis_rules": "paxlite.partitioning",
    "make_mesh": "paxlite.mesh",
    "Transformer": "paxlite.models.transformer",
    "ModelFn": "paxlite.models.build",
    "build_model": "paxlite.models.build",
    "Trainer": "paxlite.trainer",
    "explain_sharding": "paxlite.shardings",
    "ShardingTable": "paxlite.shardings",
    "load": "paxlite.runs:load_run",
    "load_run": "paxlite.runs",
    "generate": "paxlite.sample",
    "evaluate": "paxlite.evaluation",
    "export_hf": "paxlite.export",
    "import_hf": "paxlite.export",
    "make_plan": "paxlite.plan",
    "Plan": "paxlite.plan",
    "Hardware": "paxlite.costmodel",
    "DistributedConfig": "paxlite.config",
    "initialize_distributed": "paxlite.mesh",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  target = _EXPORTS.get(name)
  if target is None:
    raise AttributeError(f"module 'paxlite' has no attribute '{name}'")
  module, _, attr = target.partition(":")
  value = getattr(importlib.import_module(module), attr or name)
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
