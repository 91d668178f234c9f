"""Precision policies in the train step: fp8 matmuls and amax state, fp16 loss scaling and
checkpointing of both. Convergence against float32 on the stdlib corpus is checked by
notebooks/numerics.ipynb, which the suite runs (tests/test_notebooks.py)."""

import functools
import json
import shutil
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlite.config import ConfigError, load_config
from paxlite.mesh import make_mesh
from paxlite.numerics import FORWARD_FP8, count_gemms, scale_for
from paxlite.runs import load_run
from paxlite.trainer import Trainer

SMALL = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 16,
    "train.lr": 1e-2, "train.warmup_steps": 1, "train.steps": 3,
}
DECODER_MATMULS = 7  # q, k, v, o, gate, up, down
# Another layout changes float32 sums in the last bit; an fp8 rounding that flips on such a
# difference moves a value by up to 1/16 of itself, so fp8 losses agree to 1e-4, not 1e-5.
FP8_RTOL = 1e-4


def batches(n=3, batch=16, seq=32, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 16, (batch, seq + 1)).astype(np.int32) for _ in range(n)]


def make_trainer(overrides, single_device=True):
  cfg = load_config(None, {**SMALL, **overrides})
  return Trainer(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:1] if single_device else None))


def get(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


# ---------------------------------------------------------------------------------------
# Which matmuls run in fp8
# ---------------------------------------------------------------------------------------


def dot_operand_types(jaxpr) -> Counter:
  """(lhs dtype, rhs dtype) of every dot_general in a jaxpr and its sub-jaxprs (a scan body once)."""
  counts: Counter = Counter()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      counts[tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          counts += dot_operand_types(inner)
  return counts


@functools.lru_cache(maxsize=None)
def step_dots(fp8: str) -> Counter:
  trainer = make_trainer({"precision.compute": "bfloat16", "precision.fp8": fp8})
  batch = jax.ShapeDtypeStruct((16, 33), jnp.int32)
  with trainer.activate():
    return dot_operand_types(jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), batch).jaxpr)


@pytest.mark.parametrize("fp8", ["current", "delayed"])
def test_every_decoder_matmul_and_nothing_else_runs_in_fp8(fp8):
  baseline, counts = step_dots("none"), step_dots(fp8)
  e4, e5, bf = "float8_e4m3fn", "float8_e5m2", "bfloat16"
  # Forward: input x weight in e4m3. Backward: output grad (e5m2) x weight, input x output grad.
  assert counts[(e4, e4)] == counts[(e5, e4)] == counts[(e4, e5)] == DECODER_MATMULS, counts
  # Everything else (output head, attention scores and values) stays bfloat16.
  assert counts[(bf, bf)] == baseline[(bf, bf)] - 3 * DECODER_MATMULS, (baseline, counts)
  assert sum(counts.values()) == sum(baseline.values())

def test_fp8_head_puts_the_output_heads_three_matmuls_in_fp8():
  trainer = make_trainer({"precision.compute": "bfloat16", "precision.fp8": "delayed", "precision.fp8_head": True})
  batch = jax.ShapeDtypeStruct((16, 33), jnp.int32)
  with trainer.activate():
    counts = dot_operand_types(jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), batch).jaxpr)
  decoder_only = step_dots("delayed")
  e4, e5, bf = "float8_e4m3fn", "float8_e5m2", "bfloat16"
  assert counts[(e4, e4)] == counts[(e5, e4)] == counts[(e4, e5)] == DECODER_MATMULS + 1, counts
  assert counts[(bf, bf)] == decoder_only[(bf, bf)] - 3
  assert "head" in trainer.layout.fp8_shapes  # its own amax history, checkpointed with the rest
  for bad, key in (({"precision.fp8": "none"}, "precision.fp8"), ({"model.tie_embeddings": True}, "tie_embeddings")):
    with pytest.raises(ConfigError, match=key):
      load_config(None, {**SMALL, "precision.fp8": "delayed", "precision.fp8_head": True, **bad})


def test_projections_of_one_input_share_its_quantisation():
  """q, k, v (and gate, up) read the same normed x: with delayed scaling they take its scale
  from one history row, so XLA quantises x once per use, exactly as often as current scaling
  (whose scale is x's own amax); separate rows would quantise it 5 times per layer, not 2."""
  def activation_quantisations(fp8):
    compiled, _ = make_trainer({"precision.compute": "bfloat16", "precision.fp8": fp8}).compile_step()
    return compiled.as_text().count("= f8e4m3fn[16,32,64]")  # [batch, length, d_model]
  current, delayed = activation_quantisations("current"), activation_quantisations("delayed")
  assert delayed == current > 0, (delayed, current)



@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (XLA's cuBLASLt fp8 rewrite)")
def test_compiled_step_has_fp8_gemms_on_gpu():
  """On Hopper, every GEMM of the decoder blocks is a cuBLASLt fp8 GEMM: only the output head's
  three (forward, input and weight gradients) stay bfloat16; attention runs in cuDNN."""
  shape = {"model.d_model": 256, "model.num_heads": 4, "model.num_kv_heads": 4, "model.d_ff": 1024,
           "model.vocab_size": 512, "model.seq_len": 128, "train.batch_size": 8, "model.attention": "cudnn",
           "precision.compute": "bfloat16"}
  found = {}
  for fp8 in ("none", "delayed", "current"):
    compiled, _ = make_trainer({**shape, "precision.fp8": fp8}).compile_step()
    found[fp8] = count_gemms(compiled.as_text())
  print(found)
  assert "fp8" not in found["none"] and sum(found["none"].values()) > 3, found
  for fp8 in ("delayed", "current"):
    others = sum(n for kind, n in found[fp8].items() if kind != "fp8")
    assert found[fp8].get("fp8", 0) >= DECODER_MATMULS and others <= 3, found


# ---------------------------------------------------------------------------------------
# Amax state: accumulation, scan, sharding
# ---------------------------------------------------------------------------------------


def test_grad_accumulation_combines_amax_histories_by_max():
  """The new history of a 2-micro-batch step is the elementwise max of what each micro-batch
  gives alone: not the last micro-batch's (nor the first's), not their sum."""
  batch = batches(n=1, seed=3)[0]
  batch[1::2, :] = batch[1::2, :] % 4  # micro-batch 1 (odd rows) differs in its statistics
  fp8 = {"precision.fp8": "delayed", "precision.fp8_history": 4}
  accum = make_trainer({**fp8, "train.grad_accum": 2})
  accum.step(batch)
  combined = get(accum.state["fp8"])
  single, alone = make_trainer({**fp8, "train.batch_size": 8}), []
  for rows in (batch[0::2], batch[1::2]):  # micro-batch a takes rows a, a + 2, ...
    single.state = None  # each from the same initial state
    single.step(rows)
    alone.append(get(single.state["fp8"]))
  first, last = (jax.tree.leaves(a) for a in alone)
  for c, a, b in zip(jax.tree.leaves(combined), first, last):
    np.testing.assert_allclose(c, np.maximum(a, b), rtol=1e-6)
  newest = lambda leaves: np.stack([x[..., 0] for x in leaves])
  assert (newest(first) > newest(last)).any() and (newest(last) > newest(first)).any()
  assert float(np.concatenate([x[..., 1:].ravel() for x in jax.tree.leaves(combined)]).max()) == 0.0


@pytest.fixture(scope="module")
def delayed_reference():
  trainer = make_trainer({"precision.fp8": "delayed", "precision.fp8_history": 8})
  losses = [float(trainer.step(b)["loss"]) for b in batches()]
  return trainer, losses


def test_delayed_state_shapes_and_values(delayed_reference):
  trainer, losses = delayed_reference
  q = trainer.state["fp8"]["blocks"]["attn"]["q"]["fp8_history"]
  assert q.shape == (2, 3, 8) and q.dtype == jnp.float32  # [layers, input/kernel/grad, history]
  assert set(trainer.state["fp8"]["blocks"]["mlp"]) == {"gate", "up", "down"}
  assert "head" not in trainer.state["fp8"] and "embed" not in trainer.state["fp8"]
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.state["opt_state"])]
  assert opt_paths and not any("fp8" in p for p in opt_paths)  # the optimizer never sees it
  h = np.asarray(q)
  assert (h[:, :, :3] > 0).all() and (h[:, :, 3:] == 0).all()  # three steps pushed, newest first
  # The oldest entry of the kernel row is the amax of each layer's initial weights, rounded up
  # to the top of its power-of-two scale's range.
  initial = np.abs(np.asarray(trainer.init_state()["params"]["blocks"]["attn"]["q"]["kernel"])).max(axis=(1, 2, 3))
  scales = [float(scale_for(jnp.float32(a), FORWARD_FP8)) for a in initial]
  np.testing.assert_array_equal(h[:, 1, 2], np.array(scales) * 448.0)
  assert (initial <= h[:, 1, 2]).all() and (h[:, 1, 2] < 2 * initial).all()
  assert losses[-1] < losses[0]


def test_unrolled_layers_give_the_scanned_fp8_state(delayed_reference):
  trainer, losses = delayed_reference
  unrolled = make_trainer({"precision.fp8": "delayed", "precision.fp8_history": 8, "model.scan_layers": False,
                           "model.remat": "full"})
  np.testing.assert_allclose([float(unrolled.step(b)["loss"]) for b in batches()], losses, rtol=FP8_RTOL)
  jax.tree.map(np.testing.assert_array_equal, get(unrolled.state["fp8"]), get(trainer.state["fp8"]))


def test_sharded_fp8_state_matches_single_device(delayed_reference):
  trainer, losses = delayed_reference
  sharded = make_trainer({"precision.fp8": "delayed", "precision.fp8_history": 8, "mesh.data": 2, "mesh.fsdp": 2,
                          "mesh.tensor": 2}, single_device=False)
  np.testing.assert_allclose([float(sharded.step(b)["loss"]) for b in batches()], losses, rtol=FP8_RTOL)
  jax.tree.map(np.testing.assert_array_equal, get(sharded.state["fp8"]), get(trainer.state["fp8"]))


def test_pipelined_fp8_state_matches_single_device(delayed_reference):
  """Each pipeline stage runs its layer once per micro-batch inside one differentiated step:
  the histories still record each tensor's largest scale, as one device running the batch."""
  trainer, losses = delayed_reference
  piped = make_trainer({"precision.fp8": "delayed", "precision.fp8_history": 8, "mesh.stage": 2, "mesh.data": 4,
                        "pipeline.microbatches": 2}, single_device=False)
  np.testing.assert_allclose([float(piped.step(b)["loss"]) for b in batches()], losses, rtol=FP8_RTOL)
  jax.tree.map(np.testing.assert_array_equal, get(piped.state["fp8"]), get(trainer.state["fp8"]))
  assert piped.state["fp8"]["blocks"]["mlp"]["up"]["fp8_history"].addressable_shards[0].data.shape[0] == 1


# ---------------------------------------------------------------------------------------
# fp16 loss scaling
# ---------------------------------------------------------------------------------------


def test_fp16_overflowing_loss_scale_skips_halves_and_trains_on():
  start = 2.0 ** 28  # d(loss)/d(logits) ~ scale / 512 tokens overflows float16 (max 65504) at once
  trainer = make_trainer({"precision.compute": "float16", "precision.loss_scale_init": start, "train.steps": 25,
                          "train.warmup_steps": 2, "train.lr": 3e-3})
  init = get(trainer.init_state())
  trainer.state = jax.device_put(init, trainer.state_shardings)
  data = batches(n=25, seed=1)
  first = get(trainer.step(data[0]))
  assert first["loss_scale"] == start and first["skipped_steps"] == 1 and not np.isfinite(first["grad_norm"])
  state = get(trainer.state)
  assert int(state["step"]) == 1  # the step counts, but nothing else moved
  jax.tree.map(np.testing.assert_array_equal, state["params"], init["params"])
  jax.tree.map(np.testing.assert_array_equal, state["opt_state"], init["opt_state"])
  records = [first] + [get(trainer.step(b)) for b in data[1:]]
  skipped = int(records[-1]["skipped_steps"])
  assert 1 < skipped < 20
  assert float(trainer.state["loss_scale"]["scale"]) == start / 2 ** skipped
  assert all(r["skipped_steps"] == skipped for r in records[-10:])  # then trains on without skipping
  assert np.isfinite([r["loss"] for r in records]).all()
  assert records[-1]["loss"] < records[skipped]["loss"] - 0.5


def test_loss_scale_overflows_are_not_nan_events(tmp_path):
  """train.on_nan=stop would end the run on a non-finite step: an overflow the loss scaler
  handles (skip, halve) is not one."""
  cfg = load_config(None, {**SMALL, "precision.compute": "float16", "precision.loss_scale_init": 2.0 ** 28,
                           "train.on_nan": "stop", "train.steps": 12, "train.log_every": 1, "data.source": "synthetic",
                           "eval.every": 0, "checkpoint.every": 0, "run.tensorboard": False, "run.dir": str(tmp_path)})
  history = Trainer(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:1])).train()
  assert [r["step"] for r in history] == list(range(1, 13))
  assert history[-1]["skipped_steps"] >= 5 and history[-1]["nan_steps"] == 0


# ---------------------------------------------------------------------------------------
# Metrics and checkpoints
# ---------------------------------------------------------------------------------------


def test_fp8_and_loss_scale_state_checkpoint_and_resume(tmp_path, data_cache):
  run = {**SMALL, "precision.compute": "bfloat16", "precision.fp8": "delayed", "precision.fp8_history": 4,
         "precision.loss_scale": "dynamic", "precision.loss_scale_period": 2, "train.batch_size": 8,
         "train.lr": 3e-3, "train.log_every": 1, "data.max_files": 20, "eval.every": 0, "checkpoint.every": 2,
         "run.tensorboard": False, "train.steps": 4}
  cfg = lambda d: load_config(None, {**run, "run.dir": str(tmp_path / d)})
  straight = Trainer(cfg("a"), mesh=make_mesh(cfg("a").mesh, jax.devices()[:1]))
  reference = straight.train()  # checkpoints 2 and 4
  shutil.copytree(tmp_path / "a" / "checkpoints" / "2", tmp_path / "b" / "checkpoints" / "2")
  resumed = Trainer(cfg("b"), mesh=make_mesh(cfg("b").mesh, jax.devices()[:1]))
  second = resumed.train()  # from checkpoint 2, as a new process would
  assert [r["step"] for r in second] == [3, 4]
  np.testing.assert_array_equal([r["loss"] for r in second], [r["loss"] for r in reference[2:]])
  jax.tree.map(np.testing.assert_array_equal, get(resumed.state["fp8"]), get(straight.state["fp8"]))
  assert get(resumed.state["loss_scale"]) == get(straight.state["loss_scale"])
  # Sampling and evaluation start from load_run: the run's histories come with its weights.
  model, _ = load_run(str(tmp_path / "a"))
  np.testing.assert_array_equal(np.asarray(model.blocks.mlp.down.fp8_history[...]),
                                get(straight.state["fp8"])["blocks"]["mlp"]["down"]["fp8_history"])
  # Period 2: the scale doubles after every second finite step; metrics.jsonl logs the one used.
  assert [r["loss_scale"] for r in reference] == [32768.0, 32768.0, 65536.0, 65536.0]
  assert all(r["skipped_steps"] == 0 for r in reference)
  with open(tmp_path / "a" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert [r["loss_scale"] for r in logged] == [32768.0, 32768.0, 65536.0, 65536.0]
