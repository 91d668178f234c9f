"""`paxlite plan`: will a config fit, and how fast will it run, before it is launched?

The real train step is lowered and compiled ahead of time for N devices without the hardware:
the mesh is laid over N simulated CPU devices (`--xla_force_host_platform_device_count`), so
XLA's SPMD partitioner produces the per-device program a pod would run. From it come the
per-device memory (`compiled.memory_analysis()`), the collectives of the optimized HLO with their
bytes (paxlite.hlo) and, from the cost model (paxlite.costmodel), FLOPs and an estimated step time.

The CPU compiler is not the GPU's, so two things are adjusted for a gpu or tpu target:
  * attention: where the target would run cuDNN's fused flash attention (`model.attention:
    auto` with 16-bit compute on GPU, or `cudnn`), the CPU compile uses `blockwise`, whose saved
    tensors are cuDNN's (XLA's attention would keep [length, length] probabilities per layer);
  * temporaries: the CPU compiler runs bf16/fp16 matmuls in float32 and keeps their float32
    results, so with 16-bit compute the temporaries other than the gradients are scaled by
    (compute bytes / 4). On configs/bench-1.7b.yaml (one H200, remat none, dots_saveable, full)
    this predicts 90.2, 54.4 and 35.1 GB against measured peaks of 86.5, 52.4 and 32.6 GB.

`search` tries every factorisation of the devices into (data, fsdp, stage, tensor) that the
model's shapes allow, times the remat policies; the cost model estimates each one's memory and
step time, and the fastest that fit are compiled to confirm their memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Sequence

import jax

from paxlite.config import DCN_AXES, MESH_AXES, Config, ConfigError, validate
from paxlite.costmodel import Estimate, Hardware, default_hardware, estimate
from paxlite.hlo import Collective, collectives
from paxlite.mesh import dcn_sizes, make_mesh, mesh_sizes
from paxlite.shardings import explain_sharding
from paxlite.trainer import Trainer

REMATS = ("none", "dots_attention_saveable", "full")


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of a compiled step."""

  params: float
  opt_state: float
  other_inputs: float
  """The batch and the step counter: arguments that are neither parameters nor optimizer state."""
  outputs: float
  """Outputs not written over donated inputs."""
  temporaries: float
  """Gradients, activations and XLA's scratch, as planned for the target (see module doc)."""
  temporaries_cpu: float
  """The same as the CPU compiler reported it."""

  @property
  def total(self) -> float:
    return self.params + self.opt_state + self.other_inputs + self.outputs + self.temporaries


@dataclasses.dataclass(frozen=True)
class Plan:
  """One layout of one config on N devices: estimated, and compiled when `memory` is set."""

  mesh: dict[str, int]
  dcn: dict[str, int]
  remat: str
  microbatches: int
  hardware: Hardware
  estimate: Estimate
  memory: Memory | None = None
  collectives: tuple[Collective, ...] = ()
  compile_s: float | None = None
  attention: str = ""
  """The attention implementation the CPU compile used."""
  memory_scale: float = 1.0
  """Correction of the cost model's memory by the layouts compiled so far (search)."""

  @property
  def compiled(self) -> bool:
    return self.memory is not None

  @property
  def memory_bytes(self) -> float:
    """Compiled per-device memory when compiled, else the cost model's (corrected)."""
    return self.memory.total if self.memory is not None else self.estimate.memory * self.memory_scale

  @property
  def fits(self) -> bool:
    return self.memory_bytes <= self.hardware.usable_memory

  def overrides(self) -> list[str]:
    """The key=value overrides that select this layout."""
    out = [f"mesh.{a}={self.mesh[a] // self.dcn.get(a, 1)}" for a in MESH_AXES]
    out += [f"mesh.dcn_{a}={self.dcn[a]}" for a in DCN_AXES if self.dcn.get(a, 1) > 1]
    out.append(f"model.remat={self.remat}")
    if self.mesh["stage"] > 1:
      out.append(f"pipeline.microbatches={self.microbatches}")
    return out

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Plan":
    return cls(mesh=d["mesh"], dcn=d["dcn"], remat=d["remat"], microbatches=d["microbatches"],
               hardware=Hardware(**d["hardware"]), estimate=Estimate(**d["estimate"]),
               memory=Memory(**d["memory"]) if d["memory"] else None,
               collectives=tuple(Collective(**dict(c, axes=tuple(c["axes"]))) for c in d["collectives"]),
               compile_s=d["compile_s"], attention=d["attention"], memory_scale=d["memory_scale"])


def planning_config(cfg: Config, hw: Hardware) -> Config:
  """`cfg` as compiled on CPU for `hw`: cuDNN attention becomes its blockwise stand-in."""
  attention = cfg.model.attention
  sixteen_bit = cfg.precision.compute in ("bfloat16", "float16")
  if hw.platform == "gpu" and (attention == "cudnn" or (attention == "auto" and sixteen_bit)):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="blockwise"))
  if attention == "cudnn":
    raise ConfigError(f"model.attention: cudnn runs only on GPUs, but --platform is {hw.platform}")
  return cfg


def _layout(cfg: Config, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
  return mesh_sizes(cfg.mesh, num_devices), dcn_sizes(cfg.mesh)


def compile_plan(cfg: Config, hw: Hardware, devices: Sequence[Any]) -> Plan:
  """Compiles the train step of `cfg` for `hw` on `devices` (CPU stand-ins) and reads it."""
  mesh_shape, dcn = _layout(cfg, len(devices))
  planned = planning_config(cfg, hw)
  est = estimate(planned, mesh_shape, hw)
  trainer = Trainer(planned, mesh=make_mesh(planned, devices))
  compiled, seconds = trainer.compile_step()
  m = compiled.memory_analysis()
  state = est.params + est.opt_state
  temp = float(m.temp_size_in_bytes)
  target_temp = temp
  compute_bytes = 2 if cfg.precision.compute in ("bfloat16", "float16") else 4
  if hw.platform in ("gpu", "tpu") and compute_bytes == 2:
    target_temp = est.gradients + max(temp - est.gradients, 0.0) * compute_bytes / 4
  memory = Memory(params=est.params, opt_state=est.opt_state,
                  other_inputs=max(float(m.argument_size_in_bytes) - state, 0.0),
                  outputs=float(m.output_size_in_bytes - m.alias_size_in_bytes),
                  temporaries=target_temp, temporaries_cpu=temp)
  ops = tuple(collectives(compiled.as_text(), dict(trainer.mesh.shape)))
  return Plan(mesh=mesh_shape, dcn=dcn, remat=cfg.model.remat, microbatches=cfg.pipeline.microbatches,
              hardware=hw, estimate=est, memory=memory, collectives=ops, compile_s=seconds,
              attention=planned.model.attention)


# ---------------------------------------------------------------------------------------
# Search over layouts
# ---------------------------------------------------------------------------------------


def _factorisations(n: int, parts: int) -> list[tuple[int, ...]]:
  """Every ordered tuple of `parts` positive integers whose product is n."""
  if parts == 1:
    return [(n,)]
  return [(d,) + rest for d in range(1, n + 1) if n % d == 0 for rest in _factorisations(n // d, parts - 1)]


def _microbatches(cfg: Config, stages: int, replicas: int) -> int:
  """Pipeline micro-batches for a searched layout: the most that divide each replica's rows,
  up to 4 x stages (bubble (P-1)/(M+P-1) <= 1/5 at M = 4P)."""
  if stages == 1:
    return 1
  rows = cfg.train.batch_size // (cfg.train.grad_accum * replicas)
  return max((m for m in range(1, min(rows, 4 * stages) + 1) if rows % m == 0), default=1)


def candidates(cfg: Config, num_devices: int, hw: Hardware, remats: Sequence[str] = REMATS) -> list[Config]:
  """Configs for every (data, fsdp, stage, tensor) factorisation of the devices inside a slice or
  host, every placement of the slices or hosts on (data, fsdp, stage), and every remat policy,
  that passes validation; shapes the mesh does not divide are filtered later. The slices or
  hosts are the config's (mesh.dcn_*) when it names any, else the hardware's fast-interconnect
  domains (`--ici-domain`: a GPU host's 8 NVLink-connected GPUs)."""
  granules = math.prod(dcn_sizes(cfg.mesh).values())
  if granules == 1 and hw.ici_domain and hw.ici_domain < num_devices:
    if num_devices % hw.ici_domain:
      raise ConfigError(f"--ici-domain: {hw.ici_domain} devices per host do not divide the {num_devices} devices")
    granules = num_devices // hw.ici_domain
  if num_devices % granules:
    raise ConfigError(f"--devices: {num_devices} devices do not split into the config's {granules} slices or hosts")
  out = []
  for ici in _factorisations(num_devices // granules, 4):
    for dcn in _factorisations(granules, 3):
      total = dict(zip(MESH_AXES, (ici[0] * dcn[0], ici[1] * dcn[1], ici[2] * dcn[2], ici[3])))
      if cfg.train.batch_size % (cfg.train.grad_accum * total["data"] * total["fsdp"]):
        continue
      mesh = dataclasses.replace(cfg.mesh, **dict(zip(MESH_AXES, ici)),
                                 **{f"dcn_{a}": s for a, s in zip(DCN_AXES, dcn)})
      stages = total["stage"]
      micro = _microbatches(cfg, stages, total["data"] * total["fsdp"])
      pipe = cfg.pipeline
      circular_fits = micro >= stages and cfg.model.num_layers % (stages * pipe.repeats) == 0
      if stages == 1 or (pipe.schedule == "circular" and not circular_fits):
        pipe = dataclasses.replace(pipe, schedule="gpipe", repeats=1)
      pipe = dataclasses.replace(pipe, microbatches=micro)
      for remat in remats:
        model = dataclasses.replace(cfg.model, remat=remat)
        candidate = dataclasses.replace(cfg, mesh=mesh, pipeline=pipe, model=model)
        try:
          validate(candidate)
        except ConfigError:
          continue
        out.append(candidate)
  return out


def _estimated(cfg: Config, hw: Hardware, num_devices: int, tables: dict) -> Plan | None:
  mesh_shape, dcn = _layout(cfg, num_devices)
  key = tuple(mesh_shape.values())
  try:
    if key not in tables:
      tables[key] = explain_sharding(cfg, num_devices=num_devices)
    est = estimate(planning_config(cfg, hw), mesh_shape, hw, table=tables[key])
  except ConfigError:  # a dimension the mesh does not divide
    return None
  return Plan(mesh=mesh_shape, dcn=dcn, remat=cfg.model.remat, microbatches=cfg.pipeline.microbatches,
              hardware=hw, estimate=est)


def search(cfg: Config, hw: Hardware, devices: Sequence[Any], *, top: int = 3,
           remats: Sequence[str] = REMATS) -> list[Plan]:
  """Every valid layout of `cfg` on the devices, ranked: those that fit first, fastest first
  (ties: fewer FLOPs, then less memory).

  All are estimated with the cost model. Then the best-ranked layout not yet compiled is
  compiled, until `top` compiled layouts fit (at most 3 x top compiles); after each compile the
  cost model's memory of the others is scaled by the median compiled / estimated ratio so far,
  so a model that runs low or high does not keep proposing layouts that will not fit.
  """
  n = len(devices)
  tables: dict = {}
  rank = lambda p: (not p.fits, p.estimate.step_s, p.estimate.flops, p.memory_bytes)
  pairs = [(p, c) for c in candidates(cfg, n, hw, remats) if (p := _estimated(c, hw, n, tables)) is not None]
  plans, configs = [p for p, _ in pairs], [c for _, c in pairs]
  for _ in range(3 * top):
    if sum(p.compiled and p.fits for p in plans) >= top:
      break
    waiting = [i for i in range(len(plans)) if plans[i].fits and not plans[i].compiled]
    if not waiting:
      break
    best = min(waiting, key=lambda i: rank(plans[i]))
    plans[best] = compile_plan(configs[best], hw, devices)
    scale = statistics.median(p.memory.total / p.estimate.memory for p in plans if p.compiled)
    plans = [p if p.compiled else dataclasses.replace(p, memory_scale=scale) for p in plans]
  return sorted(plans, key=rank)


# ---------------------------------------------------------------------------------------
# Running: in this process when it has the devices, else in a fresh one that does
# ---------------------------------------------------------------------------------------


def cpu_devices(num_devices: int) -> list[Any] | None:
  """`num_devices` CPU devices of this process, or None when it has fewer."""
  try:
    found = jax.devices("cpu")
  except RuntimeError:
    return None
  return list(found[:num_devices]) if len(found) >= num_devices else None


def run(cfg: Config, num_devices: int, hw: Hardware, *, search_layouts: bool = False, top: int = 3) -> list[Plan]:
  """The plan of `cfg` on `num_devices` devices (one Plan), or with `search_layouts` every
  layout ranked. Compiles here when this process has that many CPU devices (the `paxlite plan`
  command sets them up before importing jax), else in a subprocess that does."""
  devices = cpu_devices(num_devices)
  if devices is None:
    return _run_in_subprocess(cfg, num_devices, hw, search_layouts=search_layouts, top=top)
  if search_layouts:
    return search(cfg, hw, devices, top=top)
  return [compile_plan(cfg, hw, devices)]


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str, flag: str) -> float:
  """'141GB' -> 141e9, '80GiB' -> 80 * 2**30, '5e10' -> 5e10 (bytes, or bytes/s for bandwidths)."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)(?:/s)?\s*", text)
  if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
    raise ConfigError(f"{flag}: expected a positive size such as 141GB or 80GiB, got {text!r}")
  return float(m.group(1)) * _UNITS[m.group(2).lower()]


def make_plan(cfg: Config, num_devices: int, *, platform: str = "gpu", search_layouts: bool = False, top: int = 3,
              **hardware: Any) -> list[Plan]:
  """The Python face of `paxlite plan`: `hardware` overrides fields of the platform's defaults
  (memory=80e9, memory_fraction=0.9, peak_flops, ici_bandwidth, dcn_bandwidth, efficiency, ici_domain).

  >>> [p] = make_plan(load_config("configs/bench-1.7b.yaml", {"mesh.data": 1}), 1)
  >>> p.fits, p.memory.total / 1e9
  """
  hw = dataclasses.replace(default_hardware(platform, num_devices), **hardware)
  return run(cfg, num_devices, hw, search_layouts=search_layouts, top=top)


def hardware_args(hw: Hardware) -> list[str]:
  return ["--platform", hw.platform, "--device-memory", f"{hw.memory:.0f}B",
          "--memory-fraction", str(hw.memory_fraction),
          "--peak-flops", repr(hw.peak_flops), "--ici-bandwidth", f"{hw.ici_bandwidth:.0f}B",
          "--dcn-bandwidth", f"{hw.dcn_bandwidth:.0f}B", "--efficiency", str(hw.efficiency),
          "--ici-domain", str(hw.ici_domain or 0)]


def _run_in_subprocess(cfg: Config, num_devices: int, hw: Hardware, *, search_layouts: bool, top: int) -> list[Plan]:
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
      f.write(cfg.to_yaml())
    cmd = [sys.executable, "-m", "paxlite", "plan", path, "--devices", str(num_devices), *hardware_args(hw), "--json"]
    if search_layouts:
      cmd += ["--search", "--top", str(top)]
    # The command sets up its N simulated CPU devices itself, before it imports jax.
    proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode not in (0, 1) or not lines:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if last.startswith("paxlite: error: "):
      raise ConfigError(last[len("paxlite: error: "):])
    raise RuntimeError(f"paxlite plan subprocess failed (exit {proc.returncode}): {last}")
  return [Plan.from_dict(p) for p in json.loads(lines[-1])["plans"]]


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def _size(num_bytes: float) -> str:
  """Decimal units, as device memory and link speeds are quoted: '90.22 GB', '512.0 MB'."""
  for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(num_bytes) >= scale:
      return f"{num_bytes / scale:,.2f} {unit}"
  return f"{num_bytes:.0f} B"


def _mesh_text(plan: Plan) -> str:
  text = " ".join(f"{a}={plan.mesh[a]}" for a in MESH_AXES)
  across = [f"{a}={s}" for a, s in plan.dcn.items() if s > 1]
  return text + (f" (across slices/hosts: {' '.join(across)})" if across else "")


def _speed(plan: Plan, cfg: Config) -> tuple[float, float]:
  step = plan.estimate.step_s
  tokens = cfg.train.batch_size * cfg.model.seq_len / step
  return tokens, plan.estimate.model_flops / step / plan.hardware.peak_flops


def format_plan(plan: Plan, cfg: Config) -> str:
  """The report of one compiled plan."""
  hw, est, mem = plan.hardware, plan.estimate, plan.memory
  n = math.prod(plan.mesh.values())
  usable = hw.usable_memory
  verdict = "FITS" if plan.fits else "DOES NOT FIT"
  lines = [
      f"plan: {n} {hw.platform} devices ({hw.name}, {_size(hw.memory)}, {_size(usable)} usable at memory fraction "
      f"{hw.memory_fraction:g}); compiled on {n} CPU devices in {plan.compile_s:.1f} s (attention: {plan.attention})",
      f"mesh {_mesh_text(plan)}; remat {plan.remat}" + (f"; {plan.microbatches} micro-batches, bubble "
                                                          f"{est.bubble:.3f}" if plan.mesh["stage"] > 1 else ""),
      "",
      "memory per device",
      f"  parameters                           {_size(mem.params):>12}",
      f"  optimizer state                      {_size(mem.opt_state):>12}",
      f"  batch and step                       {_size(mem.other_inputs):>12}",
      f"  outputs (not donated)                {_size(mem.outputs):>12}",
      f"  gradients, activations, temporaries  {_size(mem.temporaries):>12}" + (
          f"   (the CPU compiler's: {_size(mem.temporaries_cpu)})" if mem.temporaries != mem.temporaries_cpu else ""),
      f"  total                                {_size(mem.total):>12}   {verdict}: {100 * mem.total / usable:.1f}% of "
      f"{_size(usable)} usable (cost model: {_size(est.memory)})",
      "",
      f"FLOPs per step: model {est.model_flops * n / 1e12:,.1f} TFLOP "
      f"({est.model_flops / 1e12:,.2f} TFLOP per device); "
      f"run per device with recomputation and bubbles {est.flops / 1e12:,.2f} TFLOP",
      "",
      "collectives per step (optimized HLO; inside loops x trip count)",
      f"  {'kind':<20} {'mesh axes':<14} {'count':>7} {'bytes/device':>13} {'sent/device':>13}",
  ]
  for c in plan.collectives:
    lines.append(f"  {c.kind:<20} {'+'.join(c.axes):<14} {c.count:>7} {_size(c.bytes):>13} {_size(c.wire_bytes):>13}")
  if not plan.collectives:
    lines.append("  none")
  elif hw.platform != "cpu":
    lines.append("  (the CPU compiler leaves reduce-scatters as all-reduce + slice and moves 16-bit values as float32:"
                 " a GPU or TPU sends about half these bytes for gradients and 16-bit activations)")
  tokens, mfu = _speed(plan, cfg)
  comm = ", ".join(f"{a} {_size(b)}" for a, b in est.comm_bytes.items() if b)
  lines += [
      "",
      f"cost model: compute {est.compute_s:.3f} s + collectives on the critical path {est.critical_s:.3f} s + "
      f"fsdp gathers and host copies not hidden {max(0.0, est.overlappable_s - est.compute_s):.3f} s = step "
      f"{est.step_s:.3f} s; "
      f"{tokens:,.0f} tokens/s; MFU {100 * mfu:.1f}%",
      f"  at {hw.peak_flops / 1e12:g} TFLOP/s x {hw.efficiency:g}, ICI {_size(hw.ici_bandwidth)}/s, DCN "
      f"{_size(hw.dcn_bandwidth)}/s; sent per device: {comm or 'nothing'}",
      "",
      f"{verdict}",
  ]
  return "\n".join(lines)


def format_search(plans: Sequence[Plan], cfg: Config, *, rows: int = 20) -> str:
  """The ranked table of a search."""
  if not plans:
    return "no layout of these devices suits the model's shapes and the batch size"
  hw = plans[0].hardware
  header = (f"{'#':>3}  {'data':>4} {'fsdp':>4} {'stage':>5} {'tensor':>6}  {'dcn':<10} {'remat':<24} {'M':>3} "
            f"{'memory':>12} {'fits':<4} {'step s':>8} {'tokens/s':>10} {'MFU':>6} {'comm s':>7}")
  lines = [header, "-" * len(header)]
  for i, p in enumerate(plans[:rows], 1):
    dcn = ",".join(f"{a}={s}" for a, s in p.dcn.items() if s > 1) or "-"
    tokens, mfu = _speed(p, cfg)
    est = p.estimate
    memory = f"{_size(p.memory_bytes)}{' c' if p.compiled else ' ~'}"
    lines.append(f"{i:>3}  {p.mesh['data']:>4} {p.mesh['fsdp']:>4} {p.mesh['stage']:>5} {p.mesh['tensor']:>6}  "
                 f"{dcn:<10} {p.remat:<24} {p.microbatches:>3} {memory:>12} {'yes' if p.fits else 'no':<4} "
                 f"{est.step_s:>8.3f} {tokens:>10,.0f} {100 * mfu:>5.1f}% {est.critical_s + est.overlappable_s:>7.3f}")
  fitting = sum(p.fits for p in plans)
  compiled = sum(p.compiled for p in plans)
  lines += ["", f"{len(plans)} layouts, {fitting} fit {_size(hw.usable_memory)}; memory: c = compiled, ~ = cost model "
            f"({compiled} compiled); times from the cost model (paxlite/costmodel.py)"]
  if plans[0].fits:
    lines.append(f"best: {' '.join(plans[0].overrides())}")
  return "\n".join(lines)
