"""Remat policies: each gives the same numbers, and keeps what it says it keeps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlite.config import load_config
from paxlite.costmodel import block_residual_bytes
from paxlite.mesh import make_mesh
from paxlite.models.transformer import _REMAT_POLICIES
from paxlite.trainer import Trainer

SMALL = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 16,
    "train.lr": 1e-2, "train.warmup_steps": 1, "train.steps": 2,
}


def make_trainer(overrides, single_device=False):
  cfg = load_config(None, {**SMALL, **overrides})
  return Trainer(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:1] if single_device else None))


def batches(n=2, batch=16, seq=32):
  rng = np.random.default_rng(0)
  return [rng.integers(0, 16, (batch, seq + 1)).astype(np.int32) for _ in range(n)]


def test_every_policy_is_in_the_config_choices():
  for remat in _REMAT_POLICIES:
    assert load_config(None, {"model.remat": remat}).model.remat == remat


@pytest.mark.parametrize("remat,scan", [("operands_saveable", True), ("offload", True), ("offload", False)])
def test_policy_gives_the_losses_of_no_remat(remat, scan):
  """float32 on data x fsdp x tensor: recomputation and host copies change no number."""
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.scan_layers": scan}
  losses = {}
  for policy in ("none", remat):
    trainer = make_trainer({**mesh, "model.remat": policy})
    losses[policy] = [float(trainer.step(b)["loss"]) for b in batches()]
  np.testing.assert_allclose(losses[remat], losses["none"], rtol=1e-5)


def test_offload_keeps_block_inputs_in_host_memory():
  """The train step's backward reads each block's input from pinned host memory, and the
  device keeps nothing for it: less than full remat, which keeps those inputs on the device."""
  trainer = make_trainer({"model.remat": "offload"}, single_device=True)
  cfg = trainer.cfg
  full = block_residual_bytes(cfg, rows=16, tensor=1, remat="full")
  offload = block_residual_bytes(cfg, rows=16, tensor=1, remat="offload")
  assert full >= 16 * 32 * 64 * 4  # the block's float32 input
  assert offload < full - 16 * 32 * 64 * 4 + 1
  batch = jax.ShapeDtypeStruct((16, 33), jnp.int32)
  with trainer.activate():
    jaxpr = str(jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), batch))
  # [layers, batch, length, d_model] stacked by the scan, in host memory.
  assert "f32<host>[2,16,32,64]" in jaxpr


def test_operands_saveable_keeps_more_and_recomputes_no_quantisation():
  """With fp8, dots_attention_saveable quantises activations and weights (e4m3) again in the
  backward pass; operands_saveable keeps the quantised operands, so its backward pass, like
  one without remat, quantises only output gradients (e5m2)."""
  cfg = make_trainer({}, single_device=True).cfg
  assert block_residual_bytes(cfg, 16, 1, "operands_saveable") > block_residual_bytes(cfg, 16, 1, "dots_attention_saveable")

  def backward_e4m3_quantisations(remat):
    trainer = make_trainer({"precision.compute": "bfloat16", "precision.fp8": "delayed", "model.remat": remat},
                           single_device=True)
    compiled, _ = trainer.compile_step()
    return sum(1 for line in compiled.as_text().splitlines()
               if re.search(r"= f8e4m3fn\[[0-9,]+\]\S* convert\(", line) and "transpose(jvp())" in line)

  assert backward_e4m3_quantisations("dots_attention_saveable") > 0
  assert backward_e4m3_quantisations("operands_saveable") == 0


def test_operands_saveable_keeps_the_norms_statistics():
  """operands_saveable keeps what RMSNorm's backward reads (its input on the residual stream and
  1/rms per token): the backward pass takes no square root, where dots_attention_saveable's
  recomputes both norms' statistics in every block."""

  def backward_rsqrts(remat):
    compiled, _ = make_trainer({"model.remat": remat}, single_device=True).compile_step()
    return sum(1 for line in compiled.as_text().splitlines() if " rsqrt(" in line and "transpose(jvp" in line)

  assert backward_rsqrts("dots_attention_saveable") > 0
  assert backward_rsqrts("operands_saveable") == 0


@pytest.mark.parametrize("remat,hands_on_pairs", [("operands_saveable", True), ("none", True),
                                                  ("dots_attention_saveable", False), ("full", False)])
def test_blocks_hand_on_the_sum_where_the_norms_inputs_are_recomputed(remat, hands_on_pairs, monkeypatch):
  """Blocks hand the next one (x, delta) for its norm to add, where the policy keeps the norms'
  inputs; otherwise the backward pass would keep both block inputs per layer, so they hand on
  x + delta, one array, as before the fused norms."""
  from paxlite.models.transformer import DecoderBlock
  deltas = []
  on_stream = DecoderBlock.on_stream
  monkeypatch.setattr(DecoderBlock, "on_stream",
                      lambda self, x, delta, *a, **k: deltas.append(delta is not None) or on_stream(self, x, delta, *a, **k))
  trainer = make_trainer({"model.remat": remat, "model.scan_layers": False}, single_device=True)
  with trainer.activate():
    jax.make_jaxpr(trainer._step_fn)(trainer.abstract_state(), jax.ShapeDtypeStruct((16, 33), jnp.int32))
  # (jax.checkpoint traces a block once per input signature: a later block's call can be cached.)
  assert deltas[0] is False and any(deltas) == hands_on_pairs  # the first block gets the embeddings alone
