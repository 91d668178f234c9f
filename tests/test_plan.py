"""The planner: HLO collectives, the compiled plan against the real run, the cost model, the
search, the CLI, and configs/bench-1.7b.yaml planned for 64 devices."""

import dataclasses
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from paxlite import cli
from paxlite.config import load_config
from paxlite.costmodel import default_hardware, estimate, slow_axes
from paxlite.hlo import collectives
from paxlite.mesh import mesh_sizes
from paxlite.plan import make_plan, parse_size, search

# float32 compute: the CPU compile is then the program a GPU would run, byte for byte in dtype.
SMALL = {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
         "model.d_ff": 128, "model.seq_len": 64, "precision.compute": "float32", "train.batch_size": 8,
         "train.steps": 2, "train.log_every": 1, "eval.every": 0, "checkpoint.every": 0, "data.source": "synthetic",
         "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def small(tmp_path, **overrides):
  return load_config(None, {**SMALL, "run.dir": str(tmp_path), "run.tensorboard": False, **overrides})


# -- HLO ------------------------------------------------------------------------------------

HLO = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ata = f32[8]{0} all-to-all(%x), channel_id=5, replica_groups=mesh['x'=2,'y'=4], device_ids=([4,2]T(1,0)) {'y'}, dimensions={0}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ata)
}

%inner_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups=[4,2]<=[8], use_global_device_ids=true, to_apply=%add
  %ag = f32[16]{0} all-gather(%x), channel_id=2, replica_groups=mesh['a'=2,'b'=4] {'a'}, dimensions={0}, use_global_device_ids=true
  %w = (s32[], f32[8]{0}) while(%p), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[2] {
  %x = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %cp = f32[4]{0} collective-permute(%x), channel_id=3, source_target_pairs={{0,4},{4,0},{1,5},{5,1}}
  %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(%x), channel_id=6, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  ROOT %rs = f32[2]{0} reduce-scatter(%x), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
}
"""


def test_hlo_collectives_axes_bytes_and_trip_counts():
  mesh = {"data": 2, "fsdp": 2, "stage": 1, "tensor": 2}  # device id = 4 data + 2 fsdp + tensor
  found = {(c.kind, c.axes): c for c in collectives(HLO, mesh)}
  ar = found[("all-reduce", ("tensor",))]  # [4,2]<=[8]: {0,1}, {2,3}, ...
  assert (ar.count, ar.bytes, ar.group_size, ar.wire_bytes) == (5, 5 * 32, 2, 5 * 32)
  ag = found[("all-gather", ("data",))]  # mesh a=2 x b=4 grouped on a: {0,4}, {1,5}, ...
  assert (ag.count, ag.bytes, ag.wire_bytes) == (5, 5 * 64, 5 * 32)
  ata = found[("all-to-all", ("data", "fsdp"))]  # devices [0,2,4,6,1,3,5,7] as 2 x 4, grouped on y
  assert (ata.count, ata.group_size) == (15, 4)  # nested loops: 5 x 3
  assert found[("collective-permute", ("data",))].bytes == 16
  assert found[("all-gather", ("tensor",))].bytes == 64  # async start: the result, not the operand
  rs = found[("reduce-scatter", ("fsdp", "tensor"))]
  assert (rs.bytes, rs.wire_bytes) == (32, 24)  # input bytes; (g-1)/g of them sent


# -- one compiled plan ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
  """The run's own compiled step on 8 devices (what Trainer.train runs) and its memory analysis."""
  from paxlite.trainer import Trainer

  cfg = small(tmp_path_factory.mktemp("run"))
  trainer = Trainer(cfg)
  trainer.state = trainer.init_state()
  compiled, _ = trainer.compile_step()
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return cfg, trainer, compiled, total


def test_plan_memory_agrees_with_the_compiled_run(compiled_run):
  cfg, trainer, _, total = compiled_run
  [plan] = make_plan(cfg, 8, platform="cpu")
  assert plan.compiled and plan.mesh == {"data": 2, "fsdp": 2, "stage": 1, "tensor": 2}
  assert plan.memory.total == pytest.approx(total, rel=0.10)
  assert plan.attention == "auto" and plan.memory.temporaries == plan.memory.temporaries_cpu  # no GPU adjustments
  params = sum(x.addressable_shards[0].data.nbytes for x in __import__("jax").tree.leaves(trainer.state["params"]))
  assert plan.memory.params == params
  # The cost model, which search prunes with, is in the same range.
  assert plan.estimate.memory == pytest.approx(total, rel=0.25)


def test_cost_model_collectives_agree_with_the_hlo(compiled_run):
  cfg, _, compiled, _ = compiled_run
  mesh = mesh_sizes(cfg.mesh, 8)
  hlo = {c.axes: c for c in collectives(compiled.as_text(), mesh) if c.kind == "all-reduce"}
  est = estimate(cfg, mesh, default_hardware("cpu", 8))
  # 7 activation all-reduces per layer (2 forward, 5 backward) + embedding and head, float32
  assert hlo[("tensor",)].count == 7 * cfg.model.num_layers + 1
  assert est.comm_bytes["tensor"] == pytest.approx(hlo[("tensor",)].wire_bytes, rel=0.05)
  gathers = [c for c in collectives(compiled.as_text(), mesh) if c.kind == "all-gather" and c.axes == ("fsdp",)]
  gathered = est.comm_bytes["fsdp"] * 2 / 3  # two of the three fsdp passes are weight gathers
  assert gathered == pytest.approx(sum(c.wire_bytes for c in gathers), rel=0.10)


def test_gradient_reduction_is_critical_and_weight_gathers_overlap(tmp_path):
  """As measured on H200s (benchmarks/RESULTS.md, round 9): the data all-reduce and the fsdp
  reduce-scatter of the gradients add to the step; only the fsdp weight gathers hide."""
  cfg = small(tmp_path)
  hw = default_hardware("gpu", 8)
  data = estimate(cfg, {"data": 8, "fsdp": 1, "stage": 1, "tensor": 1}, hw)
  assert data.critical_s == pytest.approx(data.comm_bytes["data"] / hw.ici_bandwidth) and data.overlappable_s == 0
  fsdp = estimate(cfg, {"data": 1, "fsdp": 8, "stage": 1, "tensor": 1}, hw)
  assert fsdp.critical_s == pytest.approx(fsdp.comm_bytes["fsdp"] / 3 / hw.ici_bandwidth)
  assert fsdp.overlappable_s == pytest.approx(2 * fsdp.critical_s)
  assert data.step_s == pytest.approx(data.compute_s + data.critical_s)
  # Gathers longer than this tiny model's compute show through: step = compute + critical + rest.
  assert fsdp.step_s == pytest.approx(fsdp.critical_s + fsdp.overlappable_s)


def test_offload_costs_full_recomputation_plus_hidden_host_copies(tmp_path):
  """remat offload recomputes like full, keeps the block inputs off the device, and moves them
  to the host and back beside the compute."""
  hw = default_hardware("gpu", 8)
  mesh = {"data": 8, "fsdp": 1, "stage": 1, "tensor": 1}
  full = estimate(small(tmp_path, **{"model.remat": "full"}), mesh, hw)
  cfg = small(tmp_path, **{"model.remat": "offload"})
  offload = estimate(cfg, mesh, hw)
  assert offload.flops == full.flops and offload.critical_s == full.critical_s
  assert offload.activations < full.activations
  m = cfg.model
  block_inputs = cfg.train.batch_size // 8 * m.seq_len * m.num_layers * m.d_model * 4  # float32 compute
  assert offload.overlappable_s == pytest.approx(full.overlappable_s + 2 * block_inputs / hw.host_bandwidth)


def test_plan_for_more_devices_than_present_runs_in_a_subprocess(tmp_path):
  from paxlite.shardings import explain_sharding

  cfg = small(tmp_path, **{"mesh.data": 1, "mesh.fsdp": 16, "mesh.tensor": 1, "train.batch_size": 16})
  [plan] = make_plan(cfg, 16, platform="cpu")
  assert plan.mesh["fsdp"] == 16 and plan.compile_s > 0
  assert plan.memory.params == explain_sharding(cfg, num_devices=16).param_bytes_per_device
  assert {c.axes for c in plan.collectives} >= {("fsdp",)}


def test_the_commands_unoptimised_cpu_code_changes_nothing_a_plan_reports(tmp_path):
  """`paxlite plan` compiles without LLVM's optimisation of the CPU code, since it never runs
  the step (xla_flags.COMPILE_ONLY): its plan equals this process's fully optimised one."""
  from paxlite.plan import _run_in_subprocess

  cfg = small(tmp_path)
  [here] = make_plan(cfg, 8, platform="cpu")
  [there] = _run_in_subprocess(cfg, 8, here.hardware, search_layouts=False, top=1)
  assert dataclasses.replace(there, compile_s=here.compile_s) == here


def test_gpu_target_compiles_blockwise_attention_and_halves_16bit_temporaries(tmp_path):
  cfg = small(tmp_path, **{"precision.compute": "bfloat16"})
  [gpu] = make_plan(cfg, 8, platform="gpu")
  assert gpu.attention == "blockwise"
  grads = gpu.estimate.gradients
  assert gpu.memory.temporaries == pytest.approx(grads + (gpu.memory.temporaries_cpu - grads) / 2)


# -- cost model and search ------------------------------------------------------------------


def test_slow_axes_follow_hosts_and_slices():
  cfg = load_config(None, {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 8})
  assert slow_axes(cfg.mesh, 64, 8) == {"fsdp"}  # tensor inside each 8-GPU host, fsdp across
  assert slow_axes(cfg.mesh, 64, None) == set()
  hybrid = load_config(None, {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4, "mesh.dcn_data": 8})
  assert slow_axes(hybrid.mesh, 64, 8) == {"data"}


def test_search_ranks_fitting_layouts_by_estimated_step_time(tmp_path):
  import jax

  cfg = small(tmp_path, **{"train.batch_size": 16})
  hw = default_hardware("cpu", 8)
  hw = dataclasses.replace(hw, memory=2.5e6, ici_bandwidth=1e6, dcn_bandwidth=1e6)
  plans = search(cfg, hw, jax.devices()[:8], top=1)
  assert all(math.prod(p.mesh.values()) == 8 for p in plans)
  assert {p.remat for p in plans} == {"none", "dots_attention_saveable", "full"}
  assert all(p.mesh["tensor"] in (1, 2) for p in plans)  # 2 kv heads: tensor 4 and 8 cannot split them
  fits = [p.fits for p in plans]
  assert any(fits) and not all(fits) and fits == sorted(fits, reverse=True)  # fitting layouts first
  steps = [p.estimate.step_s for p in plans if p.fits]
  assert steps == sorted(steps)
  assert plans[0].compiled and sum(p.compiled for p in plans) <= 3
  # Equal FLOPs: fewer collective bytes rank higher.
  for a in plans:
    for b in plans:
      same = a.estimate.flops == b.estimate.flops and a.fits and b.fits
      if same and sum(a.estimate.comm_bytes.values()) < 0.5 * sum(b.estimate.comm_bytes.values()):
        assert plans.index(a) < plans.index(b), (a.mesh, b.mesh)


# -- the command ---------------------------------------------------------------------------


def test_parse_size():
  assert parse_size("141GB", "--x") == 141e9 and parse_size("80GiB", "--x") == 80 * 2**30
  assert parse_size("5e10", "--x") == 5e10 and parse_size("450GB/s", "--x") == 450e9


def test_cli_plan_that_does_not_fit_exits_1(repo_root, capsys):
  tiny = os.path.join(repo_root, "configs", "tiny.yaml")
  args = ["plan", tiny, "model.seq_len=32", "mesh.data=2", "mesh.fsdp=4", "--devices", "8", "--platform", "cpu"]
  assert cli.main(args + ["--device-memory", "100kB"]) == 1  # FITS exits 0: the 64-device test below
  out = capsys.readouterr().out
  assert out.rstrip().endswith("DOES NOT FIT") and "all-gather           fsdp" in out and "parameters" in out


@pytest.mark.parametrize("args,message", [
    (["--devices", "8", "--device-memory", "lots"], "--device-memory: expected a positive size"),
    (["--devices", "8", "--platform", "ipu"], "--platform: expected gpu, tpu or cpu"),
    (["--devices", "0"], "--devices and --top: expected positive numbers"),
    (["--devices", "3"], "train.batch_size"),
])
def test_cli_plan_errors_are_one_line(repo_root, args, message):
  proc = subprocess.run([sys.executable, "-m", "paxlite", "plan", "configs/tiny.yaml", *args], cwd=repo_root,
                        capture_output=True, text=True)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("paxlite: error:"), proc.stderr
  assert message in lines[0]


def test_bench_config_plans_for_64_devices_in_under_two_minutes(repo_root):
  """The budget the issue sets: configs/bench-1.7b.yaml, 64 devices, on a 2-core CPU."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "paxlite", "plan", "configs/bench-1.7b.yaml", "mesh.data=1",
                         "mesh.fsdp=8", "mesh.tensor=8", "--devices", "64"], cwd=repo_root, capture_output=True,
                        text=True)
  elapsed = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert elapsed < 120, elapsed
  out = proc.stdout
  assert "64 gpu devices" in out and "FITS" in out and "attention: blockwise" in out
  assert "all-gather           fsdp" in out and "all-reduce           tensor" in out
  assert "model 188.3 TFLOP" in out  # 11.49 GFLOP/token x 8 x 2048 tokens


def test_saved_bytes_counts_a_value_once_whatever_its_names():
  """One input read by three projections, each naming it as its matmul input (as q, k and v
  do), is kept once; the weights, parameters, not at all."""
  from jax.ad_checkpoint import checkpoint_name

  from paxlite.costmodel import saved_bytes
  from paxlite.models.transformer import _REMAT_POLICIES

  def three_projections(ws, x):
    return sum(jnp.sum(jnp.tanh(checkpoint_name(x, "matmul_inputs") @ checkpoint_name(w, "matmul_inputs")))
               for w in ws)

  w = (jax.ShapeDtypeStruct((64, 64), jnp.float32),) * 3
  x = jax.ShapeDtypeStruct((32, 64), jnp.float32)
  policy = _REMAT_POLICIES["operands_saveable"]
  matmul_outputs = 3 * 32 * 64 * 4  # kept by the policy as dot outputs (tanh's backward needs them)
  assert saved_bytes(jax.checkpoint(three_projections, policy=policy), w, x) == 32 * 64 * 4 + matmul_outputs


def test_block_kernels_cast_before_the_layers_are_not_a_blocks_residual(tmp_path):
  """operands_saveable keeps each projection's kernel in compute dtype; when the model hands
  the block kernels already cast (no pipeline), that copy is counted once per step, not per
  layer as a residual."""
  from paxlite.costmodel import block_residual_bytes
  cfg = small(tmp_path, **{"model.remat": "operands_saveable", "precision.compute": "bfloat16"})
  m = cfg.model
  kv = m.num_kv_heads * m.d_model // m.num_heads
  kernel_bytes = 2 * (2 * m.d_model * m.d_model + 2 * m.d_model * kv + 3 * m.d_model * m.d_ff)  # q o, k v, MLP; bf16
  per_layer = block_residual_bytes(cfg, rows=2, tensor=1, remat="operands_saveable", kernels_cast=False)
  cast = block_residual_bytes(cfg, rows=2, tensor=1, remat="operands_saveable", kernels_cast=True)
  assert per_layer - cast == kernel_bytes
