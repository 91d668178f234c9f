"""Sharded initialisation, the jitted train step, and the training loop.

The train state is a plain dict {'params', 'opt_state', 'step'} of sharded arrays; the model
is rebuilt from its NNX graph definition inside each compiled function (`nnx.merge`), so
the state is an ordinary pytree for optax, Orbax and jit donation.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from paxlite import data as data_lib
from paxlite.checkpoint import Checkpointer, abstract_like
from paxlite.config import Config, ConfigError
from paxlite.mesh import describe, make_mesh
from paxlite.metrics import MetricsWriter, Progress, Timer, flops_per_token, peak_flops_for
from paxlite.models.build import ModelFn, default_model_fn, init_params, layout_model, pipeline_schedule
from paxlite.models.build import param_layout  # noqa: F401  (moved there; still importable from here)
from paxlite.partitioning import axis_rules, constrain, resolve


def opt_state_like(abstract_opt: Any, param_shapes: Any, params_like: Any, other: Any) -> Any:
  """A tree shaped like the optimizer state: every subtree shaped like the parameters (Adam's
  moments) becomes `params_like`, every other leaf (counts) `other`. With shardings, the
  moments are sharded exactly like their parameters (ZeRO: split over fsdp)."""
  param_treedef = jax.tree.structure(param_shapes)
  is_params = lambda node: jax.tree.structure(node) == param_treedef
  return jax.tree.map(lambda node: params_like if is_params(node) else other, abstract_opt, is_leaf=is_params)


def lr_schedule(cfg: Config) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up to train.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
  t = cfg.train
  peak, floor = t.lr, t.lr * t.min_lr_ratio
  warmup, total = t.warmup_steps, t.steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, decayed)

  return schedule


def make_optimizer(cfg: Config, logical_names: dict) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on vectors (norm scales) and, unless
  train.decay_embeddings, on the token embedding table."""
  t = cfg.train

  def decays(names):
    if len(names) < 2:
      return False
    is_embedding = tuple(names[-2:]) == ("vocab", "embed")
    return t.decay_embeddings or not is_embedding

  mask = jax.tree.map(decays, logical_names, is_leaf=lambda x: isinstance(x, tuple))
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  parts.append(optax.adamw(lr_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=mask))
  return optax.chain(*parts)


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, z_loss: float) -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy in float32, and the total loss including z-loss."""
  logits_btv = logits_btv.astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  nll = jnp.mean(log_z_bt - target_logit_bt)
  total = nll + z_loss * jnp.mean(jnp.square(log_z_bt)) if z_loss else nll
  return nll, total


class Trainer:
  """Owns the mesh, the compiled step and the train state of one run.

  >>> trainer = Trainer(load_config("configs/tiny.yaml"))
  >>> history = trainer.train(steps=100)    # list of metric dicts, also written to run.dir
  >>> trainer.evaluate()                    # validation loss
  """

  def __init__(self, cfg: Config, *, model_fn: ModelFn | None = None, mesh: Mesh | None = None):
    self.cfg = cfg
    self.mesh = mesh if mesh is not None else make_mesh(cfg)
    self.rules = cfg.rules
    self.model_fn = model_fn or default_model_fn(cfg)
    self.is_writer = jax.process_index() == 0

    self.layout = layout_model(self.model_fn, self.rules, self.mesh)
    self.graphdef = self.layout.graphdef
    self.param_specs, self.logical_names = self.layout.specs, self.layout.logical_names
    self.param_shapes = self.layout.shapes
    self.num_params = self.layout.num_params

    self.tx = make_optimizer(cfg, self.logical_names)
    self.lr_schedule = lr_schedule(cfg)
    param_shardings = self.layout.shardings(self.mesh)
    replicated = NamedSharding(self.mesh, P())
    opt_shardings = opt_state_like(jax.eval_shape(self.tx.init, self.param_shapes), self.param_shapes,
                                   param_shardings, replicated)
    self.state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}

    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    self.pipeline = pipeline_schedule(cfg)
    micro = accum * (self.pipeline.microbatches if self.pipeline else 1)
    ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if (batch // micro) % ways:
      raise ConfigError(
          f"train.batch_size: {batch} sequences over {micro} micro-batches (grad_accum x pipeline.microbatches) "
          f"gives {batch // micro} per micro-batch, which data x fsdp = {ways} devices do not divide"
      )
    self.batch_sharding = NamedSharding(
        self.mesh, resolve(("batch", "length"), self.rules, what="input batch")
    )
    self.tokens_per_step = batch * cfg.model.seq_len
    # A custom model's embedding parameters cannot be told apart: its estimate is 6 x all parameters.
    self.flops_per_token = flops_per_token(cfg.model) if model_fn is None else 6.0 * self.num_params
    kind = self.mesh.devices.flat[0].device_kind
    self.peak_flops = cfg.run.peak_flops or peak_flops_for(kind)

    self.state: dict[str, Any] | None = None
    self._train_step = jax.jit(self._step_fn, donate_argnums=(0,),
                               in_shardings=(self.state_shardings, self.batch_sharding),
                               out_shardings=(self.state_shardings, None))
    self._eval_step = jax.jit(self._eval_fn, in_shardings=(self.state_shardings["params"], self.batch_sharding))
    self._loader = None
    self._checkpointer: Checkpointer | None = None

  # -- sharding helpers ------------------------------------------------------------------

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Mesh and rules in force while tracing and running the compiled functions."""
    with jax.set_mesh(self.mesh), axis_rules(self.rules):
      yield

  # -- state -----------------------------------------------------------------------------

  def init_state(self) -> dict[str, Any]:
    """Creates parameters and optimizer state directly in their shards on the devices."""
    params = init_params(self.model_fn, self.layout, self.mesh, self.rules, self.cfg.run.seed)
    with self.activate():
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}

  def abstract_state(self) -> Any:
    shapes = jax.eval_shape(lambda: {"params": self.param_shapes, "opt_state": self.tx.init(self.param_shapes),
                                     "step": jnp.zeros((), jnp.int32)})
    return abstract_like(shapes, self.state_shardings)

  def model(self, params: Any | None = None) -> nnx.Module:
    """The NNX module holding `params` (default: the current train state's)."""
    params = self.state["params"] if params is None else params
    return nnx.merge(self.graphdef, params)

  # -- compiled functions ----------------------------------------------------------------

  def _loss_fn(self, params: Any, tokens_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(self.graphdef, params)
    logits_btv = model(tokens_bt[:, :-1])
    nll, total = cross_entropy(logits_btv, tokens_bt[:, 1:], self.cfg.train.z_loss)
    return total, nll

  def _step_fn(self, state: dict[str, Any], batch_bt: jax.Array) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    params = state["params"]
    grad_fn = jax.value_and_grad(self._loss_fn, has_aux=True)
    accum = self.cfg.train.grad_accum
    if accum == 1:
      (_, nll), grads = grad_fn(params, batch_bt)
    else:
      # Micro-batch a takes rows a, a+A, a+2A, ...: each device's rows split evenly across
      # micro-batches, so the reshape needs no data movement between devices.
      b, t = batch_bt.shape
      micro_abt = constrain(batch_bt.reshape(b // accum, accum, t).swapaxes(0, 1), (None, "batch", "length"))

      def accumulate(carry, tokens_bt):
        grad_sum, nll_sum = carry
        (_, nll), grads = grad_fn(params, tokens_bt)
        return (jax.tree.map(jnp.add, grad_sum, grads), nll_sum + nll), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (grad_sum, nll_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro_abt)
      grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, params)
      nll = nll_sum / accum
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": nll, "grad_norm": grad_norm, "lr": self.lr_schedule(state["step"])}

  def _eval_fn(self, params: Any, batch_bt: jax.Array) -> jax.Array:
    return self._loss_fn(params, batch_bt)[1]

  def step(self, batch: np.ndarray) -> dict[str, jax.Array]:
    """One optimizer step on a host batch (this process's rows); updates self.state."""
    if self.state is None:
      self.state = self.init_state()
    with self.activate():
      self.state, metrics = self._train_step(self.state, self._to_global(batch))
    return metrics

  def compile_step(self) -> tuple[Any, float]:
    """Lowers and compiles the train step ahead of time; returns (compiled, seconds)."""
    start = time.perf_counter()
    batch = jax.ShapeDtypeStruct((self.cfg.train.batch_size, self.cfg.model.seq_len + 1), jnp.int32,
                                 sharding=self.batch_sharding)
    with self.activate():
      compiled = self._train_step.lower(self.abstract_state(), batch).compile()
    return compiled, time.perf_counter() - start

  def _to_global(self, local_batch: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local_batch, np.int32))

  # -- data ------------------------------------------------------------------------------

  def data_shard(self) -> tuple[int, int]:
    """(index, count): this process reads block `index` of `count` equal blocks of rows of
    every global batch, the rows its devices hold under the batch sharding. Processes whose
    devices hold the same rows (a tensor or stage axis across processes) read the same block."""
    batch = self.cfg.train.batch_size
    rows: set[int] = set()
    for index in self.batch_sharding.addressable_devices_indices_map((batch, 1)).values():
      rows.update(range(batch)[index[0]])
    first, count = min(rows), len(rows)
    if rows != set(range(first, first + count)) or first % count or batch % count:
      raise ConfigError(
          f"mesh.dcn_fsdp: process {jax.process_index()}'s devices hold rows {sorted(rows)} of each batch, not "
          f"one contiguous block, and the data loader reads one block per process; split slices or hosts "
          f"with mesh.dcn_data, or keep mesh.data=1 when mesh.dcn_fsdp > 1")
    return first // count, batch // count

  def _data_kwargs(self) -> dict[str, Any]:
    index, count = self.data_shard()
    return dict(seq_len=self.cfg.model.seq_len, vocab_size=self.cfg.model.vocab_size,
                process_index=index, process_count=count)

  def loader(self):
    if self._loader is None:
      self._loader = data_lib.make_train_loader(
          self.cfg.data, global_batch_size=self.cfg.train.batch_size, seed=self.cfg.run.seed, **self._data_kwargs())
    return self._loader

  def evaluate(self, num_batches: int | None = None) -> float:
    """Mean validation loss over `eval.batches` batches of the held-out split."""
    if self.state is None:
      self.state = self.init_state()
    batches = data_lib.make_eval_batches(
        self.cfg.data, batch_size=self.cfg.train.batch_size,
        num_batches=num_batches or self.cfg.eval.batches, **self._data_kwargs())
    with self.activate():
      losses = [self._eval_step(self.state["params"], self._to_global(b)) for b in batches]
    return float(np.mean(jax.device_get(losses)))

  # -- checkpoints -----------------------------------------------------------------------

  @property
  def checkpointer(self) -> Checkpointer:
    if self._checkpointer is None:
      self._checkpointer = Checkpointer(self.cfg.run.dir, self.cfg.checkpoint)
    return self._checkpointer

  def save(self, force: bool = False) -> None:
    step = int(jax.device_get(self.state["step"]))
    data_state = self._loader.get_state() if self._loader is not None else None
    self.checkpointer.save(step, self.state, data_state, force=force)

  def restore(self, step: int | None = None) -> int | None:
    """Loads the latest (or given) checkpoint of run.dir onto this mesh; returns its step."""
    step = self.checkpointer.latest_step() if step is None else step
    if step is None:
      return None
    state, data_state = self.checkpointer.restore(step, self.abstract_state())
    self.state = state
    if data_state is not None:
      self.loader().set_state(data_state)
    return step

  # -- the loop --------------------------------------------------------------------------

  def train(self, steps: int | None = None, *, resume: bool = True) -> list[dict[str, Any]]:
    """Trains until `steps` (default train.steps) optimizer steps are done in total.

    Resumes from run.dir's latest checkpoint when there is one. Writes config.yaml,
    metrics.jsonl, TensorBoard events and checkpoints/ into run.dir (process 0 only, except
    the checkpoint shards). Returns the logged metric records; `train_iter` streams them.
    """
    return list(self.train_iter(steps, resume=resume))

  def train_iter(self, steps: int | None = None, *, resume: bool = True) -> Iterator[dict[str, Any]]:
    """`train`, yielding each logged metric record as soon as it is written.

    >>> for record in trainer.train_iter(steps=100):
    ...   losses.append(record["loss"])

    Leaving the loop early stops training after the step just logged (checkpoints already
    written stay; the final one is only forced when `steps` is reached).
    """
    cfg = self.cfg
    total = cfg.train.steps if steps is None else steps
    run_dir = cfg.run.dir
    loader = self.loader()  # reads and checks the data before anything is written
    if self.is_writer:
      os.makedirs(run_dir, exist_ok=True)
      with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(cfg.to_yaml())
    start_step = self.restore() if resume and self.state is None else None
    if self.state is None:
      self.state = self.init_state()
    done = int(jax.device_get(self.state["step"]))

    writer = MetricsWriter(run_dir, cfg.run.tensorboard) if self.is_writer else None
    progress = Progress(total=total, initial=done, mode=cfg.run.progress, enabled=self.is_writer)
    compiled, compile_s = self.compile_step()
    progress.message(self._banner(compile_s, start_step))
    timer, steps_since_log = Timer(), 0
    try:
      while done < total:
        batch = self._to_global(next(loader))
        with self.activate():
          self.state, metrics = compiled(self.state, batch)
        done += 1
        steps_since_log += 1
        progress.update()
        last = done == total
        record = None
        if done % cfg.train.log_every == 0 or last or done == 1:
          record = {k: float(v) for k, v in jax.device_get(metrics).items()}
          record.update(self._speed(timer.lap() / steps_since_log))
          if done == 1:
            record["compile_s"] = compile_s
          if self.pipeline is not None:
            record["pipeline_bubble"] = self.pipeline.bubble
          steps_since_log = 0
          if cfg.eval.every and (done % cfg.eval.every == 0 or last):
            record["eval_loss"] = self.evaluate()
            timer.lap()  # evaluation time is not step time
          if writer is not None:
            writer.write(done, record)
          progress.log(done, record)
          if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {done}")
        if last or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
          self.save(force=last)
        if record is not None:
          yield {"step": done, **record}
          timer.lap()  # the caller's time between records is not step time either
    finally:
      if self._checkpointer is not None:
        self._checkpointer.wait()
      progress.close()
      if writer is not None:
        writer.close()

  def _speed(self, step_time_s: float) -> dict[str, float | None]:
    n = self.mesh.devices.size
    tokens_per_s = self.tokens_per_step / step_time_s
    flops_per_device = tokens_per_s * self.flops_per_token / n
    return {
        "step_time_s": step_time_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / n,
        "tflops_per_device": flops_per_device / 1e12,
        "mfu": flops_per_device / self.peak_flops if self.peak_flops else None,
    }

  def _banner(self, compile_s: float, resumed_from: int | None) -> str:
    cfg = self.cfg
    parts = [
        f"paxlite: {describe(self.mesh)}",
        f"{self.num_params / 1e6:.2f}M params",
        f"{self.flops_per_token / 1e6:.1f} MFLOP/token",
        f"batch {cfg.train.batch_size}x{cfg.model.seq_len}",
        f"compile {compile_s:.1f}s",
    ]
    if self.pipeline is not None:
      p = self.pipeline
      parts.append(f"pipeline {cfg.pipeline.schedule} P={p.stages} M={p.microbatches} R={p.repeats} "
                   f"bubble {p.bubble:.3f}")
    if resumed_from is not None:
      parts.append(f"resumed from step {resumed_from}")
    return " | ".join(parts)
