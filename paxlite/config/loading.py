"""YAML files and `key=value` overrides into a validated Config: every type mistake is a
one-line ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Union

import yaml

from paxlite.config.schema import Config, ConfigError, _show
from paxlite.config.validation import validate


def _type_name(tp: Any) -> str:
  if tp is type(None):
    return "null"
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(tp))
  if origin is list:
    return "a list"
  return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
  """Checks `value` against the annotated type `tp`; returns it (ints widened to floats)."""
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    for arg in typing.get_args(tp):
      try:
        return _coerce(key, value, arg)
      except ConfigError:
        pass
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
  if tp is type(None):
    if value is None:
      return None
  elif tp is bool:
    if isinstance(value, bool):
      return value
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif tp is float:
    # PyYAML reads `1e-3` (no dot) as a string: accept any string float() takes.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      try:
        number = float(value)
      except OverflowError:  # an int past float range
        number = math.inf
      if math.isfinite(number):
        return number
      raise ConfigError(f"{key}: expected a finite number, got {_show(value)}")
    if isinstance(value, str):
      try:
        number = float(value)
      except ValueError:
        pass
      else:
        if math.isfinite(number):
          return number
  elif tp is str:
    if isinstance(value, str):
      return value
    if isinstance(value, bool):  # YAML 1.1 reads off, no, false (and on, yes, true) as booleans
      raise ConfigError(
          f"{key}: expected a string, got {_show(value)} (YAML reads on/off, yes/no and true/false as "
          f"booleans; quote the word, or write none where the key takes it)")
  elif origin is list:
    if isinstance(value, list):
      return value
  raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
  if not isinstance(data, dict):
    raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {_show(data)}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in data.items():
    dotted = f"{prefix}.{key}" if prefix else str(key)
    if key not in names:
      raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
      kwargs[key] = _build(tp, value, dotted)
    else:
      kwargs[key] = _coerce(dotted, value, tp)
  return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
  """Builds a Config from nested plain data (as read from YAML), checking keys and types."""
  return _build(Config, data or {}, "")


class _StrictLoader(yaml.SafeLoader):
  """PyYAML's safe loader (plain data only: a `!!python/...` tag is an error, never a call)
  that also refuses a key given twice in one mapping, which PyYAML would silently resolve to
  the last value."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
  seen: set[Any] = set()
  for key_node, _ in node.value:
    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden on purpose
      continue
    key = loader.construct_object(key_node)
    try:
      duplicate = key in seen
      seen.add(key)
    except TypeError:  # an unhashable key: construct_mapping reports it
      continue
    if duplicate:
      raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                              f"found the key {_show(key)} twice", key_node.start_mark)
  data: dict[Any, Any] = {}
  yield data  # the two-step protocol of PyYAML's own constructor (anchors may refer back)
  data.update(loader.construct_mapping(node))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _load_yaml(stream: Any) -> Any:
  return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
  """Splits `a.b.c=value`; the value is a YAML scalar or list, parsed safely (never eval'd)."""
  key, sep, raw = item.partition("=")
  key = key.strip()
  if not sep or not key:
    raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=100")
  parts = key.split(".")
  if any(not p.isidentifier() for p in parts):
    raise ConfigError(f"override '{item}': '{key}' is not a dotted config key")
  try:
    value = _load_yaml(raw) if raw.strip() else ""
  except (yaml.YAMLError, ValueError) as e:  # ValueError: an int past Python's digit limit
    raise ConfigError(f"override '{key}': value {_show(raw)} is not valid YAML ({_first_line(e)})") from None
  if isinstance(value, dict):
    raise ConfigError(f"override '{key}': expected a scalar or a list, got a mapping")
  return parts, value


def _first_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
  """Returns a copy of `data` with dotted overrides set; `overrides` is a dict or key=value list."""
  import copy

  data = copy.deepcopy(data or {})
  items: list[tuple[list[str], Any]]
  if isinstance(overrides, dict):
    items = [(str(k).split("."), v) for k, v in overrides.items()]
  else:
    items = [parse_override(o) for o in overrides]
  for parts, value in items:
    node = data
    for depth, part in enumerate(parts[:-1]):
      child = node.get(part)
      if child is None:
        child = node[part] = {}
      if not isinstance(child, dict):
        raise ConfigError(f"override '{'.'.join(parts)}': '{'.'.join(parts[:depth + 1])}' is not a section")
      node = child
    node[parts[-1]] = value
  return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a YAML mapping with the safe loader (no Python object tags, no duplicate keys)."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = _load_yaml(f)
  except FileNotFoundError:
    raise ConfigError(f"config file '{path}' not found") from None
  except IsADirectoryError:
    raise ConfigError(f"config file '{path}' is a directory, expected a YAML file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"config file '{path}' cannot be read: {_first_line(e)}") from None
  except (yaml.YAMLError, ValueError) as e:
    raise ConfigError(f"config file '{path}' is not valid YAML: {_first_line(e)}") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"config file '{path}': expected a mapping of sections, got {type(data).__name__}")
  return data


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> Config:
  """Loads a YAML config (or the defaults when `path` is None), applies overrides, validates.

  >>> cfg = load_config("configs/tiny.yaml", overrides={"mesh.data": 2, "train.steps": 10})
  """
  data = read_yaml(path) if path is not None else {}
  data = apply_overrides(data, overrides or {})
  cfg = config_from_dict(data)
  validate(cfg)
  return cfg
