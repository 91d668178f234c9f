"""Typed run configuration: dataclasses, YAML loading, `key=value` overrides, validation.

A config is plain data. It is loaded once (``load_config``), validated once, and then
flows down: mesh and rules, model, trainer. Every mistake a user can make in a file or an
override is reported as a one-line ``ConfigError`` naming the key and what was expected.

Three stages, each importing only the ones before it: `schema` (the dataclasses, whose field
docstrings document every key, and the default rules), `validation` (checks that need no
devices) and `loading` (YAML and overrides into a validated Config). Import from here.
"""

from paxlite.config.loading import apply_overrides, config_from_dict, load_config, parse_override, read_yaml
from paxlite.config.schema import (
    DCN_AXES,
    DEFAULT_RULES,
    DTYPES,
    FP8_MODES,
    MESH_AXES,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    MeshConfig,
    ModelConfig,
    PipelineConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
    describe_keys,
)
from paxlite.config.validation import validate, validate_rules

__all__ = [
    "DCN_AXES", "DEFAULT_RULES", "DTYPES", "FP8_MODES", "MESH_AXES", "CheckpointConfig", "Config", "ConfigError",
    "DataConfig", "DistributedConfig", "EvalConfig", "MeshConfig", "ModelConfig", "PipelineConfig", "PrecisionConfig",
    "RunConfig", "TrainConfig", "apply_overrides", "config_from_dict", "describe_keys", "load_config",
    "parse_override", "read_yaml", "validate", "validate_rules",
]
