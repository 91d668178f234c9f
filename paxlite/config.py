"""Typed run configuration: dataclasses, YAML loading, `key=value` overrides, validation.

A config is plain data. It is loaded once (``load_config``), validated once, and then
flows down: mesh and rules, model, trainer. Every mistake a user can make in a file or an
override is reported as a one-line ``ConfigError`` naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

DTYPES = ("float32", "bfloat16", "float16")
FP8_MODES = ("none", "current", "delayed")
MESH_AXES = ("data", "fsdp", "stage", "tensor")
DCN_AXES = ("data", "fsdp", "stage")  # mesh axes that may also span slices / hosts (mesh.dcn_<axis>)


class ConfigError(ValueError):
  """A user-facing configuration mistake; the CLI prints it as one line and exits 2."""

  def __init__(self, message: str):
    # One line, whatever a key or value held: a newline in a YAML key must not split it.
    super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def _show(value: Any, limit: int = 80) -> str:
  """repr() for error messages: bounded length (and safe for ints too long to print)."""
  try:
    text = repr(value)
  except ValueError:  # int past sys.get_int_max_str_digits()
    text = f"<{type(value).__name__}>"
  return text if len(text) <= limit else text[: limit - 3] + "..."


# The default rules table: (logical axis name, mesh axes). Order matters: for each array
# dimension the first rule whose mesh axes are still free in that array wins, so a name may
# be listed twice with a fallback (T5X / MaxText semantics). `None` means replicated.
#
# Parameters: 'embed' is sharded over fsdp (ZeRO-3: every weight matrix has an embed
# dimension, so parameters and optimiser state are split fsdp ways); heads, kv_heads and mlp
# over tensor (Megatron column-then-row parallel); vocab over tensor for the embedding and
# output head. Activations: batch over (data, fsdp); activation 'act_embed' stays replicated
# so that each tensor-parallel block half ends in a single all-reduce.
DEFAULT_RULES: list[list[Any]] = [
    ["batch", ["data", "fsdp"]],
    ["length", None],
    ["act_embed", None],
    ["act_heads", "tensor"],
    ["act_kv_heads", "tensor"],
    ["act_mlp", "tensor"],
    ["act_vocab", "tensor"],
    ["vocab", "tensor"],
    ["embed", "fsdp"],
    ["embed", None],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["head_dim", None],
    ["mlp", "tensor"],
    ["norm", None],
    ["layers", "stage"],
]


# Hashable (by value; never mutated after loading) because the model keeps it, and jit
# takes a model's NNX graph definition as a static, hashed argument (paxlite.sample).
@dataclass(unsafe_hash=True)
class ModelConfig:
  num_layers: int = 2
  """Number of decoder blocks."""
  d_model: int = 64
  """Width of the residual stream."""
  num_heads: int = 4
  """Query heads per attention layer."""
  num_kv_heads: int | None = None
  """Key/value heads (grouped-query attention); must divide num_heads. Null means num_heads."""
  head_dim: int | None = None
  """Width of one head. Null means d_model // num_heads."""
  d_ff: int = 256
  """Hidden width of the SwiGLU MLP."""
  vocab_size: int = 256
  """Embedding rows: at least the tokenizer's vocabulary; divisible by the mesh axes `vocab` maps to."""
  seq_len: int = 128
  """Training sequence length in tokens."""
  max_seq_len: int | None = None
  """Longest sequence the model accepts (training and sampling). Null means seq_len."""
  rope_theta: float = 10000.0
  """Rotary position embedding base."""
  norm_eps: float = 1e-5
  """RMSNorm epsilon."""
  tie_embeddings: bool = False
  """Reuse the token embedding as the output head."""
  init_std: float = 0.02
  """Standard deviation of the normal initialiser for embeddings and projections."""
  scan_layers: bool = True
  """Run the stacked decoder layers with a scan (compile time independent of depth)."""
  remat: str = "none"
  """Rematerialisation of each decoder block: none (keep all activations) | full (recompute
  the block) | dots_saveable (keep matmul outputs) | dots_attention_saveable (also keep the
  fused attention's forward) | operands_saveable (also keep the matmuls' and attention's
  inputs, fp8-quantised ones under fp8) | offload (recompute the block, its input kept in
  host memory)."""
  attention: str = "auto"
  """Attention: auto (cudnn on GPU for 16-bit compute, else xla) | xla | cudnn (both through
  jax.nn.dot_product_attention) | blockwise (plain-JAX flash attention: cudnn's memory on any backend)."""
  norm_kernel: str = "auto"
  """RMSNorms with the residual adds before them: auto (pallas on GPU, else xla) | xla (XLA's
  fusions: two or three passes over the activations per norm) | pallas (fused Pallas kernels,
  one pass each way; GPU only; where the shapes do not fit them, and under pipelines, xla)."""


@dataclass
class MeshConfig:
  data: int = -1
  """Data-parallel axis size (per slice or host when a mesh.dcn_* axis is > 1). -1 (at most one
  axis) takes the remaining devices."""
  fsdp: int = 1
  """Fully-sharded data-parallel axis size (parameters and optimiser state split)."""
  stage: int = 1
  """Pipeline stages: the stacked layers split over this axis (rule `layers -> stage`)."""
  tensor: int = 1
  """Tensor-parallel axis size (heads and MLP split)."""
  dcn_data: int = 1
  """Slices or hosts the data axis spans: the mesh's data axis is data x dcn_data, with the
  dcn_data groups across the slow network (DCN, InfiniBand) and `data` inside a slice or host."""
  dcn_fsdp: int = 1
  """Slices or hosts the fsdp axis spans (fsdp x dcn_fsdp in all); parameter gathers cross the slow network."""
  dcn_stage: int = 1
  """Slices or hosts the pipeline spans (stage x dcn_stage stages in all); only activations cross between them."""

  @property
  def stages(self) -> int:
    """Pipeline stages in all: stage x dcn_stage."""
    return self.stage * self.dcn_stage


@dataclass
class DistributedConfig:
  coordinator: str | None = None
  """host:port of process 0's coordination service for multi-process runs. Null: $JAX_COORDINATOR_ADDRESS,
  else what a detected cluster launcher (SLURM, Open MPI, Cloud TPU, GKE) says, else one process."""
  num_processes: int | None = None
  """Processes in the run. Null: $JAX_NUM_PROCESSES, else the launcher's count."""
  process_id: int | None = None
  """This process's index, 0 .. num_processes-1. Null: $JAX_PROCESS_ID, else the launcher's rank."""
  timeout_s: int = 300
  """Seconds to wait for every process to join before failing."""


@dataclass
class PipelineConfig:
  microbatches: int = 1
  """Micro-batches per pipelined step (M); must divide train.batch_size / train.grad_accum."""
  schedule: str = "gpipe"
  """gpipe (bubble (P-1)/(M+P-1)) | circular (interleaved; bubble (P-1)/(R M+P-1), needs M >= P)."""
  repeats: int = 1
  """Virtual stages per device for the circular schedule (R); layers must divide by stage x repeats."""


@dataclass
class PrecisionConfig:
  params: str = "float32"
  """Storage dtype of parameters and optimiser state."""
  compute: str = "bfloat16"
  """Dtype of activations and matrix multiplies; norms, softmax and the loss stay float32."""
  fp8: str = "none"
  """fp8 matmuls in the decoder blocks (attention q/k/v/o, MLP gate/up/down; the embedding,
  the head unless precision.fp8_head, norms, softmax and loss stay in compute dtype or
  float32): none | current (each tensor scaled by its own amax this step) | delayed (scaled
  by the max of an amax history). e4m3 forward, e5m2 gradients. Needs compute bfloat16 or
  float32."""
  fp8_history: int = 1024
  """Amax history length per fp8 tensor for fp8: delayed (kept in the train state and checkpoints)."""
  fp8_head: bool = False
  """Also run the output head's matmul in fp8 (with precision.fp8's scaling; its logits
  gradient in e5m2). Off by default: the logits are what the loss reads, and fp8 recipes
  usually leave the head in higher precision. Needs precision.fp8 current or delayed and an
  untied head."""
  compute_copy: bool = True
  """With unrolled layers (model.scan_layers=false), compute narrower than params, paxlite's own
  model and no pipeline: between steps, keep each decoder-block parameter and its optimizer
  moments as one array per layer, and the blocks' kernels also in compute dtype, written by
  the optimizer in the same pass as the params. The next step's matmuls read those copies
  instead of a pass that casts and splits the stacked kernels (~0.5% of the 1.7B bench
  step). The same arithmetic either way (across devices XLA may order a sum differently);
  2 bytes per block parameter more held between steps. Checkpoints and Trainer.state keep
  the stacked layout."""
  loss_scale: str = "auto"
  """Dynamic loss scaling: auto (on when compute is float16) | dynamic | none."""
  loss_scale_init: float = 32768.0
  """Initial loss scale; halved (and the step skipped) when gradients are not finite."""
  loss_scale_period: int = 2000
  """Consecutive finite steps after which the loss scale doubles."""


@dataclass
class TrainConfig:
  steps: int = 100
  """Optimizer steps to run."""
  batch_size: int = 8
  """Global batch size in sequences per optimizer step (all micro-batches together)."""
  grad_accum: int = 1
  """Micro-batches accumulated inside one compiled step; must divide batch_size."""
  lr: float = 3e-4
  """Peak learning rate."""
  warmup_steps: int = 10
  """Linear warm-up steps, then cosine decay to lr * min_lr_ratio at the last step."""
  min_lr_ratio: float = 0.1
  """Final learning rate as a fraction of lr."""
  weight_decay: float = 0.1
  """AdamW decoupled weight decay; never applied to norm scales."""
  decay_embeddings: bool = False
  """Whether weight decay also applies to the token embedding."""
  b1: float = 0.9
  """AdamW beta1."""
  b2: float = 0.95
  """AdamW beta2."""
  eps: float = 1e-8
  """AdamW epsilon."""
  grad_clip: float = 1.0
  """Global gradient-norm clipping threshold; 0 disables it."""
  z_loss: float = 0.0
  """Weight of the z-loss (log-partition squared) added to the cross-entropy."""
  loss_kernel: str = "auto"
  """The loss's pass over the logits (logsumexp and the targets' logits): auto (pallas on GPU,
  else xla) | xla (XLA's fusions: a max, then a sum, over the logits) | pallas (one Pallas
  kernel reading them once; GPU only; where the vocabulary is split over devices, xla)."""
  log_every: int = 10
  """Steps between metric lines."""
  on_nan: str = "skip"
  """A step whose loss or gradient norm is not finite never updates the weights; then: skip (count it
  in nan_steps and go on) | rollback (reload the last checkpoint and leave the offending batch out)
  | stop (save a checkpoint and the batch, exit 3)."""
  nan_limit: int = 20
  """Stop (as with on_nan=stop) at this many non-finite steps in a row (skip) or since the last
  new checkpoint (rollback): the run has diverged. 0: no limit."""


@dataclass
class DataConfig:
  source: str = "stdlib"
  """stdlib (the Python standard library's .py files) | synthetic (random tokens) | a path to
  a text file, a .jsonl file or a directory of such files."""
  tokenizer: str = "byte"
  """byte (256 byte-level tokens) | a path to a `tokenizers` tokenizer.json."""
  text_field: str = "text"
  """Field holding the text in JSONL records."""
  val_fraction: float = 0.02
  """Fraction of the token stream held out for validation."""
  cache_dir: str | None = None
  """Where tokenized corpora are cached (memory-mapped). Null: $PAXLITE_CACHE or ~/.cache/paxlite."""
  max_files: int | None = None
  """Read at most this many files of a directory source (sorted order). Null: all."""


@dataclass
class EvalConfig:
  every: int = 100
  """Steps between validation-loss evaluations (0 disables)."""
  batches: int = 4
  """Validation batches (of train.batch_size sequences) per evaluation."""


@dataclass
class CheckpointConfig:
  every: int = 100
  """Steps between checkpoints (0 disables; the last step is always saved)."""
  keep: int = 3
  """Most recent checkpoints kept."""
  async_save: bool = True
  """Write checkpoints in the background while training continues."""
  verify: bool = True
  """Record a sha256 of every checkpoint file when it is written and check them before restoring
  (false: check only that every file is there with its size, for very large checkpoints)."""


@dataclass
class RunConfig:
  dir: str = "runs/default"
  """Run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/."""
  seed: int = 0
  """Seed for parameter init and data order."""
  peak_flops: float | None = None
  """Peak dense bf16 FLOP/s of one device for MFU. Null: known GPUs are detected (H100/H200:
  989e12); unknown devices and CPUs report no MFU."""
  tensorboard: bool = True
  """Write TensorBoard event files."""
  progress: str = "auto"
  """Progress display: auto (a bar on a terminal or in a notebook, plain lines otherwise) | bar | lines |
  none (no bar and no per-step lines, e.g. for sweeps from Python; one-off messages such as the
  compile banner, rollbacks and signals still print, and metrics still go to the run directory)."""
  compile_cache: str = "auto"
  """Persistent cache of compiled steps, so a restarted or repeated run of the same shapes
  loads its step instead of compiling it (an fp8 step compiles for minutes): auto (a directory
  already set for jax, e.g. $JAX_COMPILATION_CACHE_DIR, else $PAXLITE_CACHE/jax or
  ~/.cache/paxlite/jax) | none (paxlite sets none up) | a directory."""


@dataclass
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  distributed: DistributedConfig = field(default_factory=DistributedConfig)
  rules: list[list[Any]] = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])
  pipeline: PipelineConfig = field(default_factory=PipelineConfig)
  precision: PrecisionConfig = field(default_factory=PrecisionConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  data: DataConfig = field(default_factory=DataConfig)
  eval: EvalConfig = field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  run: RunConfig = field(default_factory=RunConfig)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_yaml(self) -> str:
    return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Validation: everything that can be checked without devices.
# ---------------------------------------------------------------------------------------


def _positive(key: str, value: int | float | None, allow_zero: bool = False) -> None:
  if value is None:
    return
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{key}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"{key}: expected one of {' | '.join(choices)}, got {_show(value)}")


def validate_rules(rules: Any) -> None:
  if not isinstance(rules, list):
    raise ConfigError(f"rules: expected a list of [logical_name, mesh_axis | [mesh_axes] | null], got {_show(rules)}")
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"rules[{i}]: expected [logical_name, mesh_axis | [mesh_axes] | null], got {_show(rule)}")
    axes = rule[1]
    axes = [] if axes is None else ([axes] if isinstance(axes, str) else axes)
    if not isinstance(axes, (list, tuple)):
      raise ConfigError(f"rules[{i}] ({rule[0]}): expected a mesh axis, a list of them or null, got {_show(rule[1])}")
    for axis in axes:
      if axis not in MESH_AXES:
        raise ConfigError(f"rules[{i}] ({rule[0]}): unknown mesh axis {_show(axis)}, expected one of {', '.join(MESH_AXES)}")
    if len(set(axes)) != len(axes):
      raise ConfigError(f"rules[{i}] ({rule[0]}): mesh axis repeated in {_show(rule[1])}")


def validate(cfg: Config) -> None:
  """Checks values that need no devices; raises ConfigError naming the first bad key."""
  m = cfg.model
  for name in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "seq_len"):
    _positive(f"model.{name}", getattr(m, name))
  for name in ("num_kv_heads", "head_dim", "max_seq_len"):
    _positive(f"model.{name}", getattr(m, name))
  _positive("model.rope_theta", m.rope_theta)
  _positive("model.norm_eps", m.norm_eps)
  _positive("model.init_std", m.init_std)
  if m.head_dim is None and m.d_model % m.num_heads:
    raise ConfigError(
        f"model.num_heads: {m.num_heads} does not divide model.d_model={m.d_model}; set model.head_dim explicitly"
    )
  kv = m.num_kv_heads or m.num_heads
  if m.num_heads % kv:
    raise ConfigError(f"model.num_kv_heads: {kv} must divide model.num_heads={m.num_heads}")
  if m.max_seq_len is not None and m.seq_len > m.max_seq_len:
    raise ConfigError(f"model.seq_len: {m.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  _choice("model.remat", m.remat, ("none", "full", "dots_saveable", "dots_attention_saveable", "operands_saveable", "offload"))
  _choice("model.attention", m.attention, ("auto", "xla", "cudnn", "blockwise"))
  _choice("model.norm_kernel", m.norm_kernel, ("auto", "xla", "pallas"))

  for axis in MESH_AXES:
    size = getattr(cfg.mesh, axis)
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}: expected a positive size or -1 (remaining devices), got {size}")
  if sum(getattr(cfg.mesh, a) == -1 for a in MESH_AXES) > 1:
    raise ConfigError("mesh: at most one of mesh.data|fsdp|stage|tensor may be -1")
  if cfg.mesh.stage == -1:
    raise ConfigError("mesh.stage: expected an explicit number of pipeline stages, got -1")
  for axis in DCN_AXES:
    _positive(f"mesh.dcn_{axis}", getattr(cfg.mesh, f"dcn_{axis}"))
  dist = cfg.distributed
  _positive("distributed.num_processes", dist.num_processes)
  _positive("distributed.timeout_s", dist.timeout_s)
  if dist.process_id is not None:
    if dist.process_id < 0:
      raise ConfigError(f"distributed.process_id: expected a non-negative number, got {dist.process_id}")
    if dist.num_processes is not None and dist.process_id >= dist.num_processes:
      raise ConfigError(f"distributed.process_id: {dist.process_id} is not below distributed.num_processes="
                        f"{dist.num_processes}")
  if dist.coordinator is not None:
    host, sep, port = dist.coordinator.rpartition(":")
    if not (sep and host and port.isdigit()):
      raise ConfigError(f"distributed.coordinator: expected host:port, got {dist.coordinator!r}")
  pipe = cfg.pipeline
  _positive("pipeline.microbatches", pipe.microbatches)
  _positive("pipeline.repeats", pipe.repeats)
  _choice("pipeline.schedule", pipe.schedule, ("gpipe", "circular"))
  if pipe.schedule == "gpipe" and pipe.repeats != 1:
    raise ConfigError(f"pipeline.repeats: the gpipe schedule has one repeat, got {pipe.repeats} (use schedule circular)")
  validate_rules(cfg.rules)

  _choice("precision.params", cfg.precision.params, DTYPES)
  _choice("precision.compute", cfg.precision.compute, DTYPES)
  _choice("precision.fp8", cfg.precision.fp8, FP8_MODES)
  if cfg.precision.fp8 != "none" and cfg.precision.compute == "float16":
    # A float16 GEMM output overflows on one product of two e4m3 values (448^2 > 65504), and a
    # loss scale moving under the e5m2 gradient scales would make delayed amax histories stale.
    raise ConfigError("precision.fp8: fp8 matmuls need precision.compute bfloat16 or float32, got float16")
  _positive("precision.fp8_history", cfg.precision.fp8_history)
  if cfg.precision.fp8_head and cfg.precision.fp8 == "none":
    raise ConfigError("precision.fp8_head: an fp8 output head needs precision.fp8 current or delayed, got none")
  if cfg.precision.fp8_head and cfg.model.tie_embeddings:
    raise ConfigError("precision.fp8_head: the output head is the embedding table (model.tie_embeddings: true); "
                      "fp8 applies to an untied head only")
  _choice("precision.loss_scale", cfg.precision.loss_scale, ("auto", "dynamic", "none"))
  _positive("precision.loss_scale_init", cfg.precision.loss_scale_init)
  _positive("precision.loss_scale_period", cfg.precision.loss_scale_period)

  t = cfg.train
  for name in ("steps", "batch_size", "grad_accum", "log_every"):
    _positive(f"train.{name}", getattr(t, name))
  _positive("train.lr", t.lr)
  for name in ("warmup_steps", "weight_decay", "grad_clip", "z_loss", "eps"):
    _positive(f"train.{name}", getattr(t, name), allow_zero=True)
  _choice("train.loss_kernel", t.loss_kernel, ("auto", "xla", "pallas"))
  if not 0.0 <= t.min_lr_ratio <= 1.0:
    raise ConfigError(f"train.min_lr_ratio: expected a number in [0, 1], got {t.min_lr_ratio}")
  for name in ("b1", "b2"):
    if not 0.0 <= getattr(t, name) < 1.0:
      raise ConfigError(f"train.{name}: expected a number in [0, 1), got {getattr(t, name)}")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.grad_accum: {t.grad_accum} must divide train.batch_size={t.batch_size}")
  _choice("train.on_nan", t.on_nan, ("skip", "rollback", "stop"))
  _positive("train.nan_limit", t.nan_limit, allow_zero=True)
  if cfg.mesh.stages > 1:
    stages, micro, repeats = cfg.mesh.stages, pipe.microbatches, pipe.repeats
    shown = f"mesh.stage={cfg.mesh.stage}"
    if cfg.mesh.dcn_stage > 1:
      shown += f" x mesh.dcn_stage={cfg.mesh.dcn_stage}"
    if m.num_layers % (stages * repeats):
      raise ConfigError(
          f"model.num_layers: {m.num_layers} layers do not split into {shown} x "
          f"pipeline.repeats={repeats} equal stages")
    if repeats > 1 and micro < stages:
      raise ConfigError(
          f"pipeline.microbatches: the circular schedule needs at least {shown} micro-batches, got {micro}")
    if (t.batch_size // t.grad_accum) % micro:
      raise ConfigError(
          f"pipeline.microbatches: {micro} does not divide the {t.batch_size // t.grad_accum} sequences of a "
          f"step's micro-batch (train.batch_size / train.grad_accum)")

  if not cfg.data.source:
    raise ConfigError("data.source: expected stdlib, synthetic or a path, got an empty string")
  if not cfg.data.tokenizer:
    raise ConfigError("data.tokenizer: expected byte or a path to a tokenizer.json, got an empty string")
  if not 0.0 < cfg.data.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction: expected a number in (0, 1), got {cfg.data.val_fraction}")
  _positive("data.max_files", cfg.data.max_files)

  _positive("eval.every", cfg.eval.every, allow_zero=True)
  _positive("eval.batches", cfg.eval.batches)
  _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
  _positive("checkpoint.keep", cfg.checkpoint.keep)
  if not cfg.run.dir:
    raise ConfigError("run.dir: expected a directory path, got an empty string")
  _positive("run.peak_flops", cfg.run.peak_flops)
  _choice("run.progress", cfg.run.progress, ("auto", "bar", "lines", "none"))


# ---------------------------------------------------------------------------------------
# Documentation of every key, read from the docstrings under the dataclass fields.
# ---------------------------------------------------------------------------------------


def describe_keys() -> list[tuple[str, str, str]]:
  """(dotted key, default, description) for every config key, in declaration order."""
  import ast
  import inspect

  rows = []
  for section in dataclasses.fields(Config):
    cls = typing.get_type_hints(Config)[section.name]
    if not dataclasses.is_dataclass(cls):
      rows.append((section.name, "see below", "ordered partition rules: [[logical_name, mesh_axes], ...]"))
      continue
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
      if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
        docs[node.target.id] = " ".join(str(nxt.value.value).split())
    defaults = cls()
    for f in dataclasses.fields(cls):
      value = getattr(defaults, f.name)
      rows.append((f"{section.name}.{f.name}", "null" if value is None else str(value), docs.get(f.name, "")))
  return rows
