"""Sharded initialisation, the jitted train step, and the training loop.

The train state is a plain dict {'params', 'opt_state', 'step'} of sharded arrays, plus
'fp8' (the amax histories of delayed fp8 scaling, which the optimizer never sees) and
'loss_scale' (dynamic loss scaling) when the precision config asks for them; the model is
rebuilt from its NNX graph definition inside each compiled function (`nnx.merge`), so the
state is an ordinary pytree for optax, Orbax and jit donation.

Between steps the Trainer may hold the state in the form the compiled step carries it
(paxlite.step_state: unrolled layers' parameters one array per layer, plus their kernels in
compute dtype); `Trainer.state` always hands out, and takes, the stacked form that checkpoints
hold.
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
from paxlite import loss_kernels
from paxlite.checkpoint import Checkpointer, CheckpointError, abstract_like
from paxlite.compile_cache import count_cache_hits, use_compile_cache
from paxlite.config import Config, ConfigError
from paxlite.faults import LoopCounters, NonFiniteError, StopSignals, guard_update, is_finite
from paxlite.loss import cross_entropy
from paxlite.mesh import describe, make_mesh
from paxlite.metrics import MetricsWriter, Progress, Timer, flops_per_token, peak_flops_for
from paxlite.models.build import ModelFn, default_model_fn, init_params, layout_model, pipeline_schedule
from paxlite.models.transformer import Transformer, is_block_kernel
from paxlite.numerics import DtypePolicy, LossScaler, update_histories
from paxlite.optimizer import global_norm, lr_schedule, make_optimizer, opt_state_like
from paxlite.partitioning import axis_rules, constrain, resolve, split_ways
from paxlite.step_state import StepLayout


class Trainer:
  """Owns the mesh, the compiled step and the train state of one run.

  >>> trainer = Trainer(load_config("configs/tiny.yaml"))
  >>> history = trainer.train(steps=100)    # list of metric dicts, also written to run.dir
  >>> trainer.evaluate()                    # validation loss
  """

  def __init__(self, cfg: Config, *, model_fn: ModelFn | None = None, mesh: Mesh | None = None):
    self.cfg = cfg
    self.compile_cache_dir = use_compile_cache(cfg.run.compile_cache)  # before anything compiles
    self.compile_cache_hits = 0  # of the last compile_step: 1 if its step came from the cache
    self.mesh = mesh if mesh is not None else make_mesh(cfg)
    self.rules = cfg.rules
    self.model_fn = model_fn or default_model_fn(cfg)
    self.is_writer = jax.process_index() == 0

    self.layout = layout_model(self.model_fn, self.rules, self.mesh)
    self.graphdef = self.layout.graphdef
    self.param_specs, self.logical_names = self.layout.specs, self.layout.logical_names
    self.param_shapes = self.layout.shapes
    self.num_params = self.layout.num_params

    # Gradients summed layer by layer for their norm (see global_norm): unrolled layers' stacked
    # gradients (a scan stacks its own in place: nothing to gain there), whole on every device
    # (a split leaf's per-layer partial sums would each need an all-reduce).
    whole = lambda spec: math.prod(split_ways(spec, len(spec), dict(self.mesh.shape))) == 1
    self.per_layer = jax.tree.map(
        lambda names, spec: not cfg.model.scan_layers and names[:1] == ("layers",) and whole(spec),
        self.logical_names, self.param_specs, is_leaf=lambda x: isinstance(x, tuple))
    self.tx = make_optimizer(cfg, self.logical_names, self.per_layer)
    self.loss_kernel = loss_kernels.implementation(cfg.train.loss_kernel)
    self.lr_schedule = lr_schedule(cfg)
    param_shardings = self.layout.shardings(self.mesh)
    replicated = NamedSharding(self.mesh, P())
    opt_shardings = opt_state_like(jax.eval_shape(self.tx.init, self.param_shapes), self.param_shapes,
                                   param_shardings, replicated)
    self.state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
    if self.layout.fp8_shapes:
      self.state_shardings["fp8"] = self.layout.shardings(self.mesh, self.layout.fp8_specs)
    self.loss_scaler = LossScaler.from_config(cfg.precision)
    if self.loss_scaler is not None:
      self.state_shardings["loss_scale"] = jax.tree.map(lambda _: replicated, self.loss_scaler.init())

    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    self.pipeline = pipeline_schedule(cfg)
    # The form the compiled step carries the state in (paxlite.step_state); None: the public one.
    self.step_layout = self._step_layout(custom_model=model_fn is not None)
    # (The optimizer's weight-decay mask and `per_layer` fit either form: both name stacked leaves.)
    self.step_shardings = (self.state_shardings if self.step_layout is None
                           else self.step_layout.step_shardings(self.state_shardings))
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

    self._state: dict[str, Any] | None = None  # the public form, or None while...
    self._step_form: dict[str, Any] | None = None  # ...the state is held in the step's form
    self._train_step = jax.jit(self._step_fn, donate_argnums=(0,),
                               in_shardings=(self.step_shardings, self.batch_sharding),
                               out_shardings=(self.step_shardings, None))
    self._eval_step = jax.jit(self._eval_fn, in_shardings=(
        self.state_shardings["params"], self.state_shardings.get("fp8", {}), self.batch_sharding))
    self._loader = None
    self._checkpointer: Checkpointer | None = None
    self.counters = LoopCounters()  # non-finite steps, batches left out (saved in checkpoints)
    self._fresh_loader_state: dict[str, Any] | None = None  # rollback target without checkpoints
    self.stopped_by: str | None = None  # the signal that stopped the last train(), if any

  # -- sharding helpers ------------------------------------------------------------------

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Mesh and rules in force while tracing and running the compiled functions."""
    with jax.set_mesh(self.mesh), axis_rules(self.rules):
      yield

  # -- state -----------------------------------------------------------------------------

  @property
  def state(self) -> dict[str, Any] | None:
    """The train state {'params', 'opt_state', 'step', ...}, stacked as checkpoints hold it
    (None before one is made). Reading it between steps may convert it from the step's form,
    and the next step converts it back: arrays read from it are not valid after a step."""
    if self._step_form is not None:
      self._state = self._to_public(self._step_form)
      self._step_form = None
    return self._state

  @state.setter
  def state(self, state: dict[str, Any] | None) -> None:
    self._state, self._step_form = state, None

  def has_state(self) -> bool:
    """Whether a train state is held (in either form), without converting it."""
    return self._state is not None or self._step_form is not None

  def step_state(self, state: dict[str, Any]) -> dict[str, Any]:
    """A public train state in the form the compiled step (`compile_step`) takes and returns
    (the same object where the step carries the public form). Its arrays are used up."""
    if self.step_layout is None:
      return state
    with self.activate():
      return self.step_layout.to_step(state, self.step_shardings)

  def _to_public(self, step_state: dict[str, Any]) -> dict[str, Any]:
    if self.step_layout is None:
      return step_state
    with self.activate():
      return self.step_layout.to_public(step_state, self.state_shardings)

  def _state_for_step(self) -> dict[str, Any]:
    """The state in the step's form, made from the public one if that is what is held."""
    if self._step_form is None:
      if self._state is None:
        self._state = self.init_state()
      self._step_form, self._state = self.step_state(self._state), None
    return self._step_form

  def _step_layout(self, custom_model: bool) -> StepLayout | None:
    """precision.compute_copy's layout: for paxlite's own model (a custom one casts its own
    parameters), unrolled and without pipeline stages (which cast per micro-batch), where
    the compute dtype differs from the parameters'."""
    cfg = self.cfg
    compute = DtypePolicy.from_config(cfg.precision).compute_dtype
    if (not cfg.precision.compute_copy or custom_model or cfg.model.scan_layers or self.pipeline is not None
        or jnp.dtype(cfg.precision.params) == jnp.dtype(compute)):
      return None
    return StepLayout.build(self.param_shapes, self.logical_names, self.param_specs, dict(self.mesh.shape),
                            cfg.model.num_layers, compute, is_block_kernel)

  def init_state(self) -> dict[str, Any]:
    """Creates parameters and optimizer state directly in their shards on the devices."""
    return self.state_from_params(init_params(self.model_fn, self.layout, self.mesh, self.rules, self.cfg.run.seed))

  def state_from_params(self, params: Any) -> dict[str, Any]:
    """A step-0 train state around sharded `params`: fresh optimizer state, fp8 histories and
    loss scale."""
    with self.activate():
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
    rest = self._new_state({})  # step, fp8 histories, loss scale: small
    rest = jax.device_put(rest, {k: self.state_shardings[k] for k in rest})
    return {"params": params, "opt_state": opt_state, **rest}

  def _new_state(self, state: dict[str, Any]) -> dict[str, Any]:
    """`state` with a zero step, and the empty fp8 histories and initial loss scale when used."""
    state = {**state, "step": jnp.zeros((), jnp.int32)}
    if self.layout.fp8_shapes:
      state["fp8"] = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.layout.fp8_shapes)
    if self.loss_scaler is not None:
      state["loss_scale"] = self.loss_scaler.init()
    return state

  def abstract_state(self) -> Any:
    """The public train state as abstract arrays with their shardings (what checkpoints hold)."""
    shapes = jax.eval_shape(lambda: self._new_state({"params": self.param_shapes,
                                                     "opt_state": self.tx.init(self.param_shapes)}))
    return abstract_like(shapes, self.state_shardings)

  def abstract_step_state(self) -> Any:
    """`abstract_state()` in the form the compiled step takes."""
    if self.step_layout is None:
      return self.abstract_state()
    shapes = jax.eval_shape(self.step_layout.step_form, self.abstract_state())
    return abstract_like(shapes, self.step_shardings)

  def model(self, params: Any | None = None, fp8: Any | None = None) -> nnx.Module:
    """The NNX module holding `params` and `fp8` (default: the current train state's)."""
    params = self.state["params"] if params is None else params
    fp8 = self.state.get("fp8") if fp8 is None else fp8
    return self.layout.merge(params, fp8)

  def _unseen(self) -> Any:
    """Zeros for every Fp8Seen port: what the model reads; their gradients are what it saw."""
    shardings = self.layout.shardings(self.mesh, self.layout.seen_specs)
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(jnp.zeros(x.shape, x.dtype), s),
                        self.layout.seen_shapes, shardings)

  # -- compiled functions ----------------------------------------------------------------

  def _loss_fn(self, params: Any, seen: Any, fp8: Any, tokens_bt: jax.Array, loss_scale: jax.Array | None = None):
    """(loss to differentiate, cross-entropy). The gradient with respect to `seen` records the
    fp8 amaxes of this step (see paxlite.numerics)."""
    model = self.layout.merge(params, fp8, seen)
    if self.loss_kernel == "pallas" and isinstance(model, Transformer):
      # The kernel reads the logits as the head computes them (bf16): cast to float32 first,
      # they would be written out in float32 for it (XLA's own passes fuse that cast instead).
      logits_btv = model(tokens_bt[:, :-1], logits_dtype=None)
    else:
      logits_btv = model(tokens_bt[:, :-1])
    nll, total = cross_entropy(logits_btv, tokens_bt[:, 1:], self.cfg.train.z_loss, self.loss_kernel)
    return (total if loss_scale is None else total * loss_scale), nll

  def _step_fn(self, state: dict[str, Any], batch_bt: jax.Array) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    params, fp8, unseen = state["params"], state.get("fp8", {}), self._unseen()
    loss_scale = state["loss_scale"]["scale"] if self.loss_scaler is not None else None
    layout, loss_fn, model_params = self.step_layout, self._loss_fn, params
    if layout is not None:
      # The model reads the carried compute-dtype kernels, the values it would cast them to, as
      # one stack per kernel, which XLA splits back into the layers' arrays at no cost.
      # (Gradients come back in the params' dtype: see StepLayout.with_copies.)
      model_params = layout.with_copies(params, state["compute_copy"])
      loss_fn = lambda p, *args: self._loss_fn(layout.restack(p), *args)  # noqa: E731
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    accum = self.cfg.train.grad_accum
    if accum == 1:
      (_, nll), (grads, seen) = grad_fn(model_params, unseen, fp8, batch_bt, loss_scale)
    else:
      # Micro-batch a takes rows a, a+A, a+2A, ...: each device's rows split evenly across
      # micro-batches, so the reshape needs no data movement between devices.
      b, t = batch_bt.shape
      micro_abt = constrain(batch_bt.reshape(b // accum, accum, t).swapaxes(0, 1), (None, "batch", "length"))

      def accumulate(carry, tokens_bt):
        grad_sum, seen_sum, nll_sum = carry
        (_, nll), (grads, seen) = grad_fn(model_params, unseen, fp8, tokens_bt, loss_scale)
        # Seen amaxes add up like gradients: counts of one-hot scales, whose top is the max.
        return (jax.tree.map(jnp.add, grad_sum, grads), jax.tree.map(jnp.add, seen_sum, seen), nll_sum + nll), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (grad_sum, seen, nll_sum), _ = jax.lax.scan(accumulate, (zeros, unseen, jnp.zeros((), jnp.float32)), micro_abt)
      grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, params)
      nll = nll_sum / accum
    if loss_scale is not None:
      grads = jax.tree.map(lambda g: g / loss_scale.astype(g.dtype), grads)
    grad_norm = global_norm(grads, self.per_layer)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
    finite = is_finite(nll, grad_norm)  # train.on_nan: a non-finite update is never applied
    new_state = guard_update(finite, new_state, state)
    if layout is not None:  # written in the update's own pass over the params
      new_state["compute_copy"] = layout.copies(new_state["params"])
    if fp8:
      new_state["fp8"] = jax.tree.map(lambda n, o: jnp.where(finite, n, o), update_histories(fp8, seen), fp8)
    metrics = {"loss": nll, "grad_norm": grad_norm, "lr": self.lr_schedule(state["step"]), "finite": finite}
    if self.loss_scaler is not None:
      # Overflowing gradients are the loss scaler's business (skip the update, halve the
      # scale), not a train.on_nan event; a non-finite loss still is.
      new_state["loss_scale"] = self.loss_scaler.update(state["loss_scale"], finite)
      metrics.update(loss_scale=loss_scale, skipped_steps=new_state["loss_scale"]["skipped_steps"],
                     finite=jnp.isfinite(nll))
    return new_state, metrics

  def _eval_fn(self, params: Any, fp8: Any, batch_bt: jax.Array) -> jax.Array:
    return self._loss_fn(params, self._unseen(), fp8, batch_bt)[1]

  def step(self, batch: np.ndarray) -> dict[str, jax.Array]:
    """One optimizer step on a host batch (this process's rows); updates self.state."""
    state = self._state_for_step()
    with self.activate():
      self._step_form, metrics = self._train_step(state, self._to_global(batch))
    return metrics

  def compile_step(self) -> tuple[Any, float]:
    """Lowers and compiles the train step ahead of time; returns (compiled, seconds). The
    compiled step takes and returns the state in the step's form (`step_state`)."""
    start = time.perf_counter()
    batch = jax.ShapeDtypeStruct((self.cfg.train.batch_size, self.cfg.model.seq_len + 1), jnp.int32,
                                 sharding=self.batch_sharding)
    with self.activate(), count_cache_hits() as hits:
      compiled = self._train_step.lower(self.abstract_step_state(), batch).compile()
    self.compile_cache_hits = hits[0]
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
    if not self.has_state():
      self.state = self.init_state()
    batches = data_lib.make_eval_batches(
        self.cfg.data, batch_size=self.cfg.train.batch_size,
        num_batches=num_batches or self.cfg.eval.batches, **self._data_kwargs())
    with self.activate():
      losses = [self._eval_step(self.state["params"], self.state.get("fp8", {}), self._to_global(b)) for b in batches]
    return float(np.mean(jax.device_get(losses)))

  # -- checkpoints -----------------------------------------------------------------------

  @property
  def checkpointer(self) -> Checkpointer:
    if self._checkpointer is None:
      self._checkpointer = Checkpointer(self.cfg.run.dir, self.cfg.checkpoint)
    return self._checkpointer

  def save(self, force: bool = False) -> bool:
    """Starts writing a checkpoint of the current step (train state, loader position, fault
    counters); False if this step is already saved. CheckpointError if writing fails."""
    step = int(jax.device_get(self.state["step"]))
    items = {"data": self._loader.get_state() if self._loader is not None else None,
             "loop": self.counters.to_json()}
    return self.checkpointer.save(step, self.state, items, force=force)

  def restore(self, step: int | None = None) -> int | None:
    """Loads the newest good (or the given) checkpoint of run.dir onto this mesh; returns its
    step, or None without checkpoints. Damaged checkpoints are reported and skipped."""
    found = self.checkpointer.restore(self.abstract_state(), step)
    if found is None:
      return None
    self._load(found)
    self.counters = LoopCounters.from_json(found[2].get("loop"))
    return found[0]

  def _load(self, found: tuple[int, Any, dict[str, Any]]) -> None:
    _, state, items = found
    if items.get("data") is not None:
      self.loader().set_state(items["data"])  # ConfigError if batches would not resume
    self.state = state

  # -- non-finite steps ------------------------------------------------------------------

  def _next_batch(self) -> tuple[int, np.ndarray]:
    """(global batch index, this process's rows), passing over batches rollbacks left out."""
    loader = self.loader()
    while loader.step in self.counters.skipped_batches:
      next(loader)
    return loader.step, next(loader)

  def _settle(self, pending: list, keep: int, say: Callable[[str], None]) -> int | None:
    """Reads the finiteness flags of all but the newest `keep` pending steps and applies
    train.on_nan to a non-finite one. Returns the step it rolled back to, if it did."""
    t, counters = self.cfg.train, self.counters
    while len(pending) > keep:
      step, finite, index, batch = pending.pop(0)
      if bool(jax.device_get(finite)):
        if t.on_nan == "skip":
          counters.in_a_row = 0
        continue
      counters.nan_steps += 1
      counters.in_a_row += 1
      if t.on_nan == "stop":
        self._stop_nonfinite(step, batch, pending, "train.on_nan=stop")
      if t.nan_limit and counters.in_a_row >= t.nan_limit:
        since = "in a row" if t.on_nan == "skip" else "since the last checkpoint"
        self._stop_nonfinite(step, batch, pending,
                             f"{counters.in_a_row} non-finite steps {since}, train.nan_limit={t.nan_limit}")
      if t.on_nan == "skip":
        say(f"paxlite: step {step}: non-finite loss or gradients, update skipped "
            f"({counters.nan_steps} so far; train.on_nan=skip)")
        continue
      pending.clear()
      return self._rollback(step, index, batch, say)
    return None

  def _rollback(self, step: int, index: int, batch: np.ndarray, say: Callable[[str], None]) -> int:
    """Reloads the newest good checkpoint (or the initial state) and leaves batch `index` out."""
    self.counters.skipped_batches.add(index)
    found = self.checkpointer.restore(self.abstract_state())
    if found is not None:
      self._load(found)  # the counters stay this run's: they only grow
      back = found[0]
    elif self._fresh_loader_state is not None:
      self.state = self.init_state()
      self.loader().set_state(self._fresh_loader_state)
      back = 0
    else:
      self._stop_nonfinite(step, batch, [], "train.on_nan=rollback, but no checkpoint to roll back to")
    say(f"paxlite: step {step}: non-finite loss or gradients; rolled back to step {back}, leaving out "
        f"batch {index} (train.on_nan=rollback)")
    return back

  def _stop_nonfinite(self, step: int, batch: np.ndarray, pending: list, reason: str) -> None:
    """Saves the offending batch and a checkpoint (non-finite updates were never applied), and
    raises NonFiniteError."""
    for _, finite, _, _ in pending:  # already run: their updates were withheld too if bad
      self.counters.nan_steps += not bool(jax.device_get(finite))
    pending.clear()
    suffix = f".process_{jax.process_index()}" if jax.process_count() > 1 else ""
    path = os.path.join(self.cfg.run.dir, "nonfinite", f"step_{step}{suffix}.npy")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, batch)
    self.save(force=True)
    self.checkpointer.wait()
    saved = int(jax.device_get(self.state["step"]))
    raise NonFiniteError(
        f"non-finite loss or gradients at step {step} ({reason}); its batch is in {path}; checkpoint "
        f"{saved} holds the state without the non-finite updates (rerun to go on from it)", step)

  # -- the loop --------------------------------------------------------------------------

  def _open_run_dir(self, done: int) -> MetricsWriter:
    run_dir = self.cfg.run.dir
    try:
      os.makedirs(run_dir, exist_ok=True)
      with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(self.cfg.to_yaml())
      return MetricsWriter(run_dir, self.cfg.run.tensorboard, resume_step=done)
    except OSError as e:
      raise ConfigError(f"run.dir: cannot write into '{run_dir}' ({e.strerror or e})") from None

  def train(self, steps: int | None = None, *, resume: bool = True) -> list[dict[str, Any]]:
    """Trains until `steps` (default train.steps) optimizer steps are done in total.

    Resumes from run.dir's newest good checkpoint when there is one. Writes config.yaml,
    metrics.jsonl, TensorBoard events and checkpoints/ into run.dir (process 0 only, except
    the checkpoint shards), only once the data, config and checkpoint are known to fit.
    Non-finite steps follow train.on_nan. SIGTERM or SIGINT: the step finishes, a checkpoint
    is written, `self.stopped_by` names the signal, and training returns. Returns the logged
    metric records, one per step (after a rollback, the re-run steps' records replace the
    earlier ones); `train_iter` streams them.
    """
    history: list[dict[str, Any]] = []
    for record in self.train_iter(steps, resume=resume):
      if history and record["step"] <= history[-1]["step"]:  # a rollback: these steps run again
        history = [r for r in history if r["step"] < record["step"]]
      history.append(record)
    return history

  def train_iter(self, steps: int | None = None, *, resume: bool = True) -> Iterator[dict[str, Any]]:
    """`train`, yielding each logged metric record as soon as it is written.

    >>> for record in trainer.train_iter(steps=100):
    ...   losses.append(record["loss"])

    Leaving the loop early stops training after the step just logged (checkpoints already
    written stay; the final one is only forced when `steps` is reached). After a rollback
    (train.on_nan) the steps from the checkpoint on are run, and yielded, again.
    """
    cfg = self.cfg
    total = cfg.train.steps if steps is None else steps
    loader = self.loader()  # reads and checks the data before anything is written
    start_step = self.restore() if resume and not self.has_state() else None
    if not self.has_state():
      self.state = self.init_state()
    done = int(jax.device_get(self.state["step"]))
    self._fresh_loader_state = loader.get_state() if done == 0 else None
    writer = self._open_run_dir(done) if self.is_writer else None

    progress = Progress(total=total, initial=done, mode=cfg.run.progress, enabled=self.is_writer)
    compiled, compile_s = self.compile_step()
    progress.message(self._banner(compile_s, start_step))
    timer, steps_since_log = Timer(), 0
    # (step, finite flag, batch index, batch): flags are read one step late, so reading one
    # waits for a step the device has finished while the next is already queued.
    pending: list[tuple[int, jax.Array, int, np.ndarray]] = []
    self.stopped_by = None
    completed = False
    try:
      with StopSignals() as signals:
        while done < total and not signals.should_stop(done):
          index, batch = self._next_batch()
          state = self._state_for_step()
          with self.activate():
            self._step_form, metrics = compiled(state, self._to_global(batch))
          del state  # (donated)
          done += 1
          steps_since_log += 1
          progress.update()
          pending.append((done, metrics.pop("finite"), index, batch))
          last = done == total
          log_now = done % cfg.train.log_every == 0 or last or done == 1
          save_now = last or bool(cfg.checkpoint.every and done % cfg.checkpoint.every == 0)
          back = self._settle(pending, 0 if log_now or save_now else 1, progress.message)
          if back is not None:  # rolled back: what was logged past `back` is undone
            progress.update(back - done)
            done, steps_since_log = back, 0
            if writer is not None:
              writer.rewind(done)
            timer.lap()
            continue
          record = None
          if log_now:
            if self._checkpointer is not None:
              self._checkpointer.check()  # a failed background write stops the run now
            record = {k: float(v) for k, v in jax.device_get(metrics).items()}
            record["nan_steps"] = self.counters.nan_steps
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
          if save_now:
            if cfg.train.on_nan == "rollback":
              self.counters.in_a_row = 0  # a new checkpoint: progress since the last rollback
            self.save(force=last)
          if record is not None:
            yield {"step": done, **record}
            timer.lap()  # the caller's time between records is not step time either
        if signals.received is not None and done < total:  # (a signal in the last step changes nothing)
          self._settle(pending, 0, progress.message)
          self.save(force=True)
          self.checkpointer.wait()
          self.stopped_by = signals.received
          step = int(jax.device_get(self.state["step"]))
          progress.message(f"paxlite: {signals.received} received: stopped after step {step}, checkpoint "
                           f"{step} is saved in {self.checkpointer.directory}; rerun the same command to resume")
      if self._checkpointer is not None:
        self._checkpointer.wait()  # a write failing in the background fails the run here
      completed = True
    finally:
      if not completed and self._checkpointer is not None:
        try:  # let a good checkpoint still in flight finish; the error already raised wins
          self._checkpointer.wait()
        except CheckpointError as e:
          progress.message(f"paxlite: {e}")
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
        f"compile {compile_s:.1f}s" + (" (from the compile cache)" if self.compile_cache_hits else ""),
    ]
    if self.pipeline is not None:
      p = self.pipeline
      parts.append(f"pipeline {cfg.pipeline.schedule} P={p.stages} M={p.microbatches} R={p.repeats} "
                   f"bubble {p.bubble:.3f}")
    if resumed_from is not None:
      parts.append(f"resumed from step {resumed_from}")
    return " | ".join(parts)
