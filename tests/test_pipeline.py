"""Pipeline parallelism: every schedule and mesh gives the non-pipelined single-device numbers."""

import json
import os

import jax
import numpy as np
import pytest

from paxlite.config import ConfigError, load_config
from paxlite.mesh import make_mesh
from paxlite.pipeline import Schedule
from paxlite.trainer import Trainer

BASE = {
    "model.num_layers": 8, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 16,
    "train.lr": 3e-3, "train.warmup_steps": 1, "train.steps": 3,
}
GPIPE = {"pipeline.schedule": "gpipe"}
CIRCULAR = {"pipeline.schedule": "circular", "pipeline.repeats": 2}
MESHES = {
    "stage2_data4": {"mesh.stage": 2, "mesh.data": 4, "pipeline.microbatches": 2},
    "stage2_data2_tensor2": {"mesh.stage": 2, "mesh.data": 2, "mesh.tensor": 2, "pipeline.microbatches": 4},
    "stage4_fsdp2": {"mesh.stage": 4, "mesh.data": 1, "mesh.fsdp": 2, "pipeline.microbatches": 4},
}


def batches(n=3):
  rng = np.random.default_rng(0)
  return [rng.integers(0, 16, (16, 33)).astype(np.int32) for _ in range(n)]


def run(overrides, devices=None):
  cfg = load_config(None, {**BASE, **overrides})
  trainer = Trainer(cfg, mesh=make_mesh(cfg.mesh, devices))
  metrics = [trainer.step(b) for b in batches()]
  return trainer, np.array([[float(m["loss"]), float(m["grad_norm"])] for m in metrics])


@pytest.fixture(scope="module")
def reference():
  return run({"mesh.data": 1}, jax.devices()[:1])[1]


@pytest.mark.parametrize("schedule", [GPIPE, CIRCULAR], ids=["gpipe", "circular"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_pipelined_losses_and_grads_equal_single_device(reference, mesh, schedule):
  trainer, got = run({**MESHES[mesh], **schedule})
  np.testing.assert_allclose(got, reference, rtol=1e-5)
  # The stacked layer weights really are split over the stages.
  q = trainer.state["params"]["blocks"]["attn"]["q"]["kernel"]
  assert q.addressable_shards[0].data.shape[0] == 8 // trainer.mesh.shape["stage"]


def test_pipeline_with_gradient_accumulation_equals_single_device(reference):
  _, got = run({"mesh.stage": 2, "mesh.data": 4, "pipeline.microbatches": 2, "train.grad_accum": 2, **CIRCULAR})
  np.testing.assert_allclose(got, reference, rtol=1e-5)


def test_bubble_formula():
  assert Schedule(4, 8).bubble == pytest.approx(3 / 11)
  assert Schedule(4, 8, repeats=2).bubble == pytest.approx(3 / 19)
  assert Schedule(2, 4, repeats=2).iterations == 9


def test_parameter_bytes_per_device_fall_with_stages():
  sizes = {}
  for stages in (1, 2, 4):
    overrides = {"mesh.stage": stages, "mesh.data": 8 // stages, "pipeline.microbatches": 2, "train.batch_size": 32,
                 "model.d_ff": 256}
    cfg = load_config(None, {**BASE, **overrides})
    compiled, _ = Trainer(cfg).compile_step()
    sizes[stages] = compiled.memory_analysis().argument_size_in_bytes
  # Parameters + Adam moments dominate the arguments; the embedding and head (~6% here)
  # are not split over stages, hence the small allowance above 1/P.
  assert sizes[2] / sizes[1] < 0.5 + 0.06
  assert sizes[4] / sizes[1] < 0.25 + 0.06


def test_checkpoint_moves_between_pipelined_and_plain_meshes(tmp_path):
  common = {**BASE, "data.source": "synthetic", "train.steps": 4, "train.log_every": 1, "eval.every": 0,
            "checkpoint.every": 2, "pipeline.microbatches": 2}
  staged = {"mesh.stage": 2, "mesh.data": 4}
  plain = {"mesh.stage": 1, "mesh.data": 8}
  reference = Trainer(load_config(None, {**common, **plain, "run.dir": str(tmp_path / "ref")})).train()
  for first, second, name in ((staged, plain, "s2_to_s1"), (plain, staged, "s1_to_s2")):
    run_dir = str(tmp_path / name)
    head = Trainer(load_config(None, {**common, **first, "run.dir": run_dir})).train(steps=2)
    tail = Trainer(load_config(None, {**common, **second, "run.dir": run_dir})).train()
    assert [r["step"] for r in tail] == [3, 4]
    np.testing.assert_allclose([r["loss"] for r in head + tail], [r["loss"] for r in reference], rtol=1e-5)
  records = [json.loads(line) for line in open(os.path.join(tmp_path, "s1_to_s2", "metrics.jsonl"))]
  assert records[-1]["pipeline_bubble"] == pytest.approx(1 / 3)
  assert "pipeline_bubble" not in records[0]


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.stage": 3, "mesh.data": 1}, "model.num_layers: 8 layers do not split into mesh.stage=3"),
    ({"mesh.stage": 2, "pipeline.schedule": "circular", "pipeline.repeats": 3},
     "do not split into mesh.stage=2 x pipeline.repeats=3"),
    ({"mesh.stage": 4, "pipeline.schedule": "circular", "pipeline.repeats": 2, "pipeline.microbatches": 2},
     "circular schedule needs at least mesh.stage=4 micro-batches"),
    ({"mesh.stage": 2, "pipeline.microbatches": 3}, "pipeline.microbatches: 3 does not divide the 16"),
    ({"pipeline.repeats": 2}, "the gpipe schedule has one repeat"),
    ({"pipeline.schedule": "1f1b"}, "pipeline.schedule: expected one of gpipe | circular"),
])
def test_pipeline_config_errors(overrides, message):
  with pytest.raises(ConfigError, match=message):
    load_config(None, {**BASE, **overrides})


def test_microbatches_must_split_over_data_devices():
  with pytest.raises(ConfigError, match="gives 2 per micro-batch, which data x fsdp = 4 devices do not divide"):
    Trainer(load_config(None, {**BASE, "mesh.stage": 2, "mesh.data": 4, "pipeline.microbatches": 8}))
