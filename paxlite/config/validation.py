"""Checks of a Config that need no devices; each raises a one-line ConfigError naming the
first bad key."""

from __future__ import annotations

from typing import Any

from paxlite.config.schema import DCN_AXES, DTYPES, FP8_MODES, MESH_AXES, Config, ConfigError, _show


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
  if cfg.run.compile_cache.lower() in ("off", "false", "no", "disabled", ""):
    raise ConfigError(f"run.compile_cache: expected auto, none or a directory, got {_show(cfg.run.compile_cache)} "
                      f"(none sets no cache up; write ./{cfg.run.compile_cache or 'DIR'} for a directory of that name)")
