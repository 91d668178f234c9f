"""The analytic cost model behind `paxlite plan --search`: memory and step time of a layout
without compiling it.

Memory per device = parameters + optimizer state (exact, from `explain_sharding`) + gradients
(parameter-sized; the block kernels' in compute dtype) + the batch + saved activations + the
transient of one layer's backward + the float32 logits + the block kernels' compute-dtype copy
(the model casts them once per step; not under pipelines, whose blocks cast their own). Saved
activations per layer are what JAX's autodiff keeps for one decoder block under the remat
policy, traced abstractly at per-device shapes (what `jax.ad_checkpoint.print_saved_residuals`
lists, each buffer once however many names it has), times the layers a device holds.

Step time = compute + critical communication + max(0, overlappable communication - compute):
  compute  = FLOPs per device / (peak FLOP/s x efficiency). FLOPs per device count every layer
             pass a device runs (pipeline bubble iterations included: all stages run every
             iteration), the output head (not split over stages), and recomputation (remat full or
             offload +1/3 of the layer FLOPs, dots_saveable +1/3 of the attention FLOPs, pipelines +1/3:
             each iteration is rematerialised).
  critical = tensor-parallel all-reduces (7 per layer pass as XLA partitions paxlite's block,
             +1 recomputed under remat full or offload, +2 for the embedding and head), pipeline
             permutes (the stage's activations: forward, backward and recomputation, every
             iteration), and the gradient reduction: the all-reduce over data and the
             reduce-scatter over fsdp. Measured on H200s, that reduction is not hidden: data=2
             and data=4 added 21 and 26 ms to the 1.7B step (ring estimate 16 and 24 ms), with
             layers scanned or unrolled alike (benchmarks/RESULTS.md, rounds 8-10).
  overlappable = the fsdp weight all-gathers (forward and backward), once per accumulation
             micro-batch; XLA's latency-hiding scheduler runs them beside the matmuls. Under
             remat offload, also each block's input to host memory and back.
Ring algorithms: all-reduce moves 2 (g-1)/g of the buffer per device, all-gather and
reduce-scatter (g-1)/g of the full buffer. An axis whose device groups leave a fast-interconnect
domain (a GPU host's NVLink, a TPU slice: `Hardware.ici_domain`) runs at the DCN bandwidth, any
other at the ICI bandwidth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from paxlite.config import MESH_AXES, Config, ConfigError, MeshConfig, ModelConfig, PrecisionConfig
from paxlite.mesh import device_array
from paxlite.metrics import count_params, flops_per_token, peak_flops_for
from paxlite.models.build import no_eager_sharding, pipeline_schedule
from paxlite.models.transformer import _REMAT_POLICIES, LAYER_INPUT, DecoderBlock, kernels_in_compute_dtype
from paxlite.numerics import DtypePolicy
from paxlite.shardings import ShardingTable, explain_sharding

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Hardware:
  """What a device can do; the defaults per platform are datasheet figures (see README)."""

  platform: str
  """gpu | tpu | cpu: which compiler's behaviour the plan models."""
  name: str
  memory: float
  """Bytes of device memory."""
  memory_fraction: float
  """Share of `memory` the run may use (on GPU, XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)."""
  peak_flops: float
  """Dense bf16 FLOP/s of one device."""
  ici_bandwidth: float
  """Bytes/s one device moves along a mesh axis inside a slice or host (NVLink, ICI)."""
  dcn_bandwidth: float
  """Bytes/s one device moves along a mesh axis spanning slices or hosts (InfiniBand, DCN)."""
  efficiency: float = 0.55
  """Fraction of peak FLOP/s a step's compute reaches (paxlite's best measured H200 MFU: 55%)."""
  host_bandwidth: float = 50e9
  """Bytes/s between one device and its host's memory, each way (PCIe 5.0 x16: 64 GB/s raw)."""
  ici_domain: int | None = None
  """Devices sharing the fast interconnect: a GPU host's NVLink domain (8 on HGX H100/H200), a
  TPU slice. None: all devices. Mesh axes whose device groups leave a domain run at DCN speed."""

  @property
  def usable_memory(self) -> float:
    return self.memory * self.memory_fraction


def default_hardware(platform: str, num_devices: int) -> Hardware:
  """H200 for gpu (NVIDIA: 141 GB, 989 TFLOP/s bf16 dense, NVLink 900 GB/s both ways, one
  400 Gb/s NIC per GPU); TPU v5p for tpu (Google Cloud: 95 GiB, 459 TFLOP/s, ICI 1200 GB/s both
  ways over a 3D torus's three axes, DCN 50 Gb/s per chip); this host's memory split over the
  devices for cpu, with rough compute and copy rates."""
  if platform == "gpu":
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))
    return Hardware("gpu", "NVIDIA H200", 141e9, fraction, peak_flops_for("NVIDIA H200"), 450e9, 50e9, ici_domain=8)
  if platform == "tpu":
    return Hardware("tpu", "TPU v5p", 95 * 2**30, 1.0, peak_flops_for("TPU v5p"), 400e9, 6.25e9)
  if platform == "cpu":
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", "host CPU", host / num_devices, 1.0, 1e11, 10e9, 10e9)
  raise ConfigError(f"--platform: expected gpu, tpu or cpu, got {platform!r}")


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Per-device memory (bytes) and step time (seconds) of one layout, from the cost model."""

  params: float
  opt_state: float
  gradients: float
  batch: float
  activations: float
  """Saved activations, one layer's backward transient, the float32 logits, and the block
  kernels' compute-dtype copy."""
  model_flops: float
  """Model FLOPs per device per step (6 N + 12 L d T per token, the MFU numerator)."""
  flops: float
  """FLOPs a device runs per step: bubbles and recomputation included."""
  comm_bytes: dict[str, float]
  """Bytes each device sends per step, per mesh axis (ring algorithms)."""
  compute_s: float
  critical_s: float
  """Communication the step waits for: tensor and pipeline transfers, the gradient reduction."""
  overlappable_s: float
  """Transfers that run beside the compute: fsdp weight gathers, offloaded activations."""
  bubble: float

  @property
  def memory(self) -> float:
    return self.params + self.opt_state + self.gradients + self.batch + self.activations

  @property
  def step_s(self) -> float:
    return self.compute_s + self.critical_s + max(0.0, self.overlappable_s - self.compute_s)


# Remat policies that recompute the whole block in the backward pass (offload keeps its input
# in host memory, full on the device).
_RECOMPUTE_BLOCK = ("full", "offload")


def _bytes(dtype: Any) -> int:
  return jnp.dtype(dtype).itemsize


def block_residual_bytes(cfg: Config, rows: int, tensor: int, remat: str, kernels_cast: bool = True) -> float:
  """Bytes one decoder block keeps for its backward pass on one device: `rows` sequences,
  heads and MLP split `tensor` ways, under `remat` (parameters, stored anyway, not counted).
  `kernels_cast`: the block gets its kernels already in compute dtype, as the model casts the
  stacked kernels once before the layers (not under pipelines, whose blocks cast their own)."""
  model = tuple(dataclasses.asdict(cfg.model).items())
  return _block_residual_bytes(model, cfg.precision.params, cfg.precision.compute, rows, tensor, remat, kernels_cast)


# Primitives that return their operand's value (same shape and dtype), so a residual they make
# shares its buffer with that operand: a checkpoint name, remat's reduce_precision barrier, a
# sharding constraint. One value named several times (the normed x each projection names as its
# input, the attention output the o projection names again) is kept once.
_SAME_VALUE = ("name", "reduce_precision", "sharding_constraint", "copy", "convert_element_type")


@functools.lru_cache(maxsize=256)
def _block_residual_bytes(model: tuple, params_dtype: str, compute_dtype: str, rows: int, tensor: int,
                          remat: str, kernels_cast: bool) -> float:
  m = ModelConfig(**dict(model))
  heads = m.num_heads // tensor
  local = dataclasses.replace(m, num_heads=heads, num_kv_heads=(m.num_kv_heads or m.num_heads) // tensor,
                              head_dim=m.head_dim or m.d_model // m.num_heads, d_ff=m.d_ff // tensor)
  policy = DtypePolicy.from_config(PrecisionConfig(params=params_dtype, compute=compute_dtype))
  with no_eager_sharding():
    block = nnx.eval_shape(lambda: DecoderBlock(local, param_dtype=policy.param_dtype,
                                                compute_dtype=policy.compute_dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(block)
  if kernels_cast:  # as Transformer hands them to the layers
    state = jax.eval_shape(lambda s: kernels_in_compute_dtype(s, policy.compute_dtype), state)

  # As Transformer._run_blocks runs each block, on one input array where it may hand on (x,
  # delta): the residuals are the same, each norm keeping its own summed input either way.
  def apply(params, x_btd, positions_bt):
    return nnx.merge(graphdef, params)(checkpoint_name(x_btd, LAYER_INPUT), positions_bt)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=_REMAT_POLICIES[remat])
  x = jax.ShapeDtypeStruct((rows, m.seq_len, m.d_model), policy.compute_dtype)
  positions = jax.ShapeDtypeStruct((rows, m.seq_len), jnp.int32)
  return saved_bytes(apply, state, x, positions)


def saved_bytes(fn: Callable[..., Any], params: Any, *inputs: Any) -> float:
  """Device bytes that the backward pass of `fn(params, *inputs)` keeps from its forward pass
  (arrays or jax.ShapeDtypeStructs): each buffer once, however many names it goes by; the
  parameters, stored anyway, and values offloaded to the host not counted."""
  # The residuals are the trailing outputs of the traced vjp (what jax's private
  # saved_residuals reads).
  leaves, treedef = jax.tree.flatten((params, *inputs))
  num_params = len(jax.tree.leaves(params))
  vjp = lambda *flat: jax.vjp(lambda *a: fn(*jax.tree.unflatten(treedef, a)), *flat)
  closed, (_, vjp_fn) = jax.make_jaxpr(vjp, return_shape=True)(*leaves)
  outvars = closed.jaxpr.outvars
  residuals = outvars[len(outvars) - len(jax.tree.leaves(vjp_fn)):]
  param_vars = set(closed.jaxpr.invars[:num_params])
  producers = {out: eqn for eqn in closed.jaxpr.eqns for out in eqn.outvars}

  def value(v):  # the variable whose buffer v is
    while (eqn := producers.get(v)) is not None and eqn.primitive.name in _SAME_VALUE and len(eqn.invars) == 1:
      source = eqn.invars[0]
      if not hasattr(source, "aval") or hasattr(source, "val") or source.aval.shape != v.aval.shape \
          or source.aval.dtype != v.aval.dtype:
        break
      v = source
    return v

  kept = {value(v) for v in residuals if hasattr(v, "aval") and not hasattr(v, "val")
          and str(getattr(v.aval, "memory_space", "")) != "MemorySpace.Host"}  # offloaded: not on the device
  return float(sum(math.prod(v.aval.shape) * _bytes(v.aval.dtype) for v in kept - param_vars))


def slow_axes(mesh_cfg: MeshConfig, num_devices: int, ici_domain: int | None) -> set[str]:
  """Mesh axes whose device groups span more than one fast-interconnect domain.

  The devices are laid out as `make_mesh` would (hybrid when a mesh.dcn_* axis is > 1), with
  domains of `ici_domain` consecutive devices (hosts number their devices consecutively)."""
  domain = min(ici_domain or num_devices, num_devices)
  if num_devices % domain:
    raise ConfigError(f"--ici-domain: {domain} devices per domain do not divide the {num_devices} devices")
  slots = [_Slot(i, i // domain) for i in range(num_devices)]
  hosts = np.vectorize(lambda slot: slot.process_index)(device_array(mesh_cfg, slots))
  return {axis for i, axis in enumerate(MESH_AXES) if (np.diff(hosts, axis=i) != 0).any()}


@dataclasses.dataclass(frozen=True)
class _Slot:  # a device position: `device_array` only reads these two fields
  id: int
  process_index: int


def _ring(kind: str, group: int, size: float) -> float:
  if group <= 1:
    return 0.0
  return (2.0 if kind == "all-reduce" else 1.0) * (group - 1) / group * size


def estimate(cfg: Config, mesh_shape: dict[str, int], hw: Hardware,
             table: ShardingTable | None = None) -> Estimate:
  """The cost model's memory and step time for `cfg` on a mesh of `mesh_shape` (its total axis
  sizes). Raises ConfigError when the layout is impossible (indivisible shapes). `table` is
  `explain_sharding(cfg)` when already at hand."""
  m, t = cfg.model, cfg.train
  n = math.prod(mesh_shape.values())
  data, fsdp, stages, tensor = (mesh_shape[a] for a in ("data", "fsdp", "stage", "tensor"))
  table = table or explain_sharding(cfg, num_devices=n)
  params, opt = table.param_bytes_per_device, table.opt_state_bytes_per_device
  c = _bytes(cfg.precision.compute)
  rows = t.batch_size // (t.grad_accum * data * fsdp)  # per device, per accumulation micro-batch
  if rows < 1 or t.batch_size % (t.grad_accum * data * fsdp):
    raise ConfigError(f"train.batch_size: {t.batch_size} does not split over grad_accum x data x fsdp")
  schedule = pipeline_schedule(cfg)
  d, seq, layers = m.d_model, m.seq_len, m.num_layers

  # -- memory --------------------------------------------------------------------------
  # The model casts the block kernels to compute dtype once per step (stacked before a scan,
  # each layer's after the split when unrolled; not under pipelines): that copy lives through
  # the step (unrolled, with precision.compute_copy, the step carries it from the last one
  # instead: the same bytes), and the layers' kernel gradients come out in compute dtype too
  # (converted to float32 inside the optimizer's update).
  cast = schedule is None
  kernels = sum(p.local_bytes for p in table.params if p.name.startswith("blocks.") and p.name.endswith(".kernel"))
  kernel_copy = kernels * c / _bytes(cfg.precision.params) if cast else 0.0
  gradients = params - kernels + kernel_copy if cast else params
  if schedule is None:  # one stage: every layer's residuals, for every accumulation micro-batch in turn
    saved = layers * block_residual_bytes(cfg, rows, tensor, m.remat)
    transient_rows, iterations, micro_rows = rows, 1, rows
  else:
    micro_rows = rows // schedule.microbatches
    iterations = schedule.iterations
    per_stage = layers // (stages * schedule.repeats)
    # Each pipeline iteration is rematerialised: kept are the stage input of every iteration
    # and the finished micro-batches, then one iteration's layers are live during backward.
    saved = (iterations + schedule.microbatches) * micro_rows * seq * d * c
    saved += per_stage * block_residual_bytes(cfg, micro_rows, tensor, m.remat, kernels_cast=False)
    transient_rows = micro_rows
  recomputes = m.remat != "none" or schedule is not None
  transient = block_residual_bytes(cfg, transient_rows, tensor, "none", kernels_cast=cast) if recomputes else 0.0
  logits = rows * seq * (m.vocab_size // tensor) * 4  # float32 logits (their gradient reuses the buffer)
  batch = t.batch_size // (data * fsdp) * (seq + 1) * 4

  # -- FLOPs ---------------------------------------------------------------------------
  counts = count_params(m)
  head_params = m.vocab_size * d
  layer_params = (counts["non_embedding"] - head_params - d) / layers
  tokens_dev = t.batch_size * seq / (data * fsdp)
  # layer-token passes one device runs per step, every iteration of a pipeline included
  if schedule is None:
    passes = tokens_dev * layers
  else:
    passes = t.grad_accum * iterations * micro_rows * seq * layers / (stages * schedule.repeats)
  attention = 12.0 * d * seq
  recompute = 0.0
  if m.remat in _RECOMPUTE_BLOCK:
    recompute += (6 * layer_params + attention) / 3
  elif m.remat == "dots_saveable":
    recompute += attention / 3
  if schedule is not None:
    recompute += (6 * layer_params + attention) / 3
  flops = passes * (6 * layer_params + attention + recompute) / tensor + tokens_dev * 6 * head_params / tensor
  model_flops = t.batch_size * seq * flops_per_token(m) / n

  # -- communication -------------------------------------------------------------------
  slow = slow_axes(cfg.mesh, n, hw.ici_domain)
  bw = {axis: hw.dcn_bandwidth if axis in slow else hw.ici_bandwidth for axis in mesh_shape}
  comm = {axis: 0.0 for axis in mesh_shape}
  comm["data"] = _ring("all-reduce", data, params)
  gathered = params * fsdp
  gathers = t.grad_accum * 2 * _ring("all-gather", fsdp, gathered)  # weights, forward and backward
  scatters = t.grad_accum * _ring("reduce-scatter", fsdp, gathered)  # gradients
  comm["fsdp"] = gathers + scatters
  # Per layer pass XLA all-reduces 2 activations forward (attention and MLP outputs) and 5
  # backward (the input gradient of each column-parallel projection, q k v gate up, separately),
  # and the attention output again when a full remat recomputes the layer (counted in the HLO).
  reductions = 7 + (1 if m.remat in _RECOMPUTE_BLOCK or schedule is not None else 0)
  tensor_bytes = passes * d * c * reductions + tokens_dev * d * c * 2
  comm["tensor"] = _ring("all-reduce", tensor, tensor_bytes)
  if schedule is not None:
    comm["stage"] = 3 * t.grad_accum * iterations * micro_rows * seq * (d * c + 4)
    comm["stage"] += 2 * (schedule.repeats - 1) / schedule.repeats * params  # circular regrouping
  critical = (comm["tensor"] / bw["tensor"] + comm["stage"] / bw["stage"] + comm["data"] / bw["data"]
              + scatters / bw["fsdp"])
  overlappable = gathers / bw["fsdp"]
  if m.remat == "offload":  # each block's input to the host in the forward pass, back in the backward
    overlappable += 2 * passes * d * c / hw.host_bandwidth
  return Estimate(
      params=params, opt_state=opt, gradients=gradients, batch=batch,
      activations=saved + transient + logits + kernel_copy,
      model_flops=model_flops, flops=flops, comm_bytes=comm, compute_s=flops / (hw.peak_flops * hw.efficiency),
      critical_s=critical, overlappable_s=overlappable, bubble=schedule.bubble if schedule else 0.0)
