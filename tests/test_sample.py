"""KV-cache decoding: the cached path gives the full forward pass's logits, greedy decoding is
the argmax at every position, and the sampling filters do what they say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paxlite.config import ConfigError, load_config
from paxlite.mesh import make_mesh
from paxlite.sample import _generate, _next_token, filter_logits, generate, prompt_bucket
from paxlite.trainer import Trainer

# init_std 0.3 spreads the logits of a random model so that argmax ties (which float32
# rounding could flip either way) do not occur.
MODEL = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 64, "model.init_std": 0.3, "precision.compute": "float32",
}
MESHES = {"1dev": {"mesh.data": 1}, "d2f2t2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}}
PROMPTS = [[5, 17, 200, 3, 9], list(range(40, 51)), [7, 7, 7]]


@pytest.fixture(scope="module")
def models():
  out = {}
  for name, mesh in MESHES.items():
    cfg = load_config(None, {**MODEL, **mesh})
    trainer = Trainer(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:1] if name == "1dev" else None))
    trainer.state = trainer.init_state()
    out[name] = trainer.model(), cfg
  return out


@pytest.fixture(scope="module")
def model_and_cfg(models):
  return models["1dev"]


@jax.jit
def _forward(graphdef, state, tokens_bt):
  return nnx.merge(graphdef, state)(tokens_bt)


def full_logits(model, tokens):
  """The full forward pass's logits; right-padded to 32 tokens (one compile for every row:
  causal attention keeps padding out of the positions before it)."""
  padded = np.zeros((1, 32), np.int32)
  padded[0, : len(tokens)] = tokens
  return np.asarray(_forward(*nnx.split(model), padded))[0, : len(tokens)]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_prefill_and_decode_steps_give_the_full_forward_logits(models, mesh):
  model, _ = models[mesh]
  rows = [p + [11, 12, 13, 14] for p in PROMPTS]  # prompt, then 4 tokens fed one at a time
  lengths = np.asarray([len(p) for p in PROMPTS])
  tokens = np.zeros((3, 16), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, : len(p)] = p

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    logits, cache = m.decode(tokens, positions, m.init_cache(3, 24))
    last, _ = m.decode(tokens, positions, m.init_cache(3, 24), jnp.asarray(lengths - 1))
    steps = []
    for j in range(4):
      step_logits, cache = m.decode(jnp.full((3, 1), 11 + j), jnp.asarray(lengths + j)[:, None], cache)
      steps.append(step_logits[:, 0])
    return logits, last[:, 0], jnp.stack(steps, 1)

  graphdef, state = nnx.split(model)
  prefill, last, steps = jax.device_get(run(state))
  for i, row in enumerate(rows):
    ref = full_logits(model, row)
    n = lengths[i]
    np.testing.assert_allclose(prefill[i, :n], ref[:n], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(last[i], ref[n - 1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(steps[i], ref[n : n + 4], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_greedy_decoding_is_the_argmax_of_the_full_forward_pass(models, mesh):
  model, cfg = models[mesh]
  new = generate(model, PROMPTS, max_new_tokens=12, rules=cfg.rules)
  assert new.shape == (3, 12) and new.dtype == np.int32
  for prompt, row in zip(PROMPTS, new):
    argmax = full_logits(model, prompt + row.tolist()).argmax(-1)
    np.testing.assert_array_equal(row, argmax[len(prompt) - 1 : -1])
  assert len({tuple(r) for r in new}) == 3  # the rows really are different continuations


def test_one_compiled_program_per_shape_not_per_setting(model_and_cfg):
  model, cfg = model_and_cfg
  generate(model, PROMPTS, max_new_tokens=12, rules=cfg.rules)
  compiled = _generate._cache_size()
  a = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_k=5, top_p=0.9, seed=1, rules=cfg.rules)
  # Other prompts of the same batch size and length bucket (<= 16 tokens).
  b = generate(model, [[1, 2], [3], list(range(16))], max_new_tokens=12, temperature=0.5, seed=1, rules=cfg.rules)
  assert _generate._cache_size() == compiled
  assert b.shape == (3, 12) and a.shape == (3, 12)
  generate(model, PROMPTS, max_new_tokens=13, rules=cfg.rules)
  assert _generate._cache_size() == compiled + 1


def test_seed_decides_the_sample(model_and_cfg):
  model, cfg = model_and_cfg
  options = dict(max_new_tokens=12, temperature=1.0, rules=cfg.rules)
  a = generate(model, PROMPTS, seed=3, **options)
  np.testing.assert_array_equal(a, generate(model, PROMPTS, seed=3, **options))
  assert not np.array_equal(a, generate(model, PROMPTS, seed=4, **options))
  # top_k=1 leaves only the argmax, whatever the temperature.
  greedy = generate(model, PROMPTS, max_new_tokens=12, rules=cfg.rules)
  np.testing.assert_array_equal(generate(model, PROMPTS, seed=3, top_k=1, **options), greedy)


def test_eos_ends_a_row(model_and_cfg):
  model, cfg = model_and_cfg
  greedy = generate(model, PROMPTS, max_new_tokens=12, rules=cfg.rules)
  eos = int(greedy[0, 3])
  first = list(greedy[0]).index(eos)
  out = generate(model, PROMPTS, max_new_tokens=12, eos_id=eos, rules=cfg.rules)
  np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
  assert (out[0, first:] == eos).all()
  for row_out, row_greedy in zip(out[1:], greedy[1:]):
    if eos not in row_greedy:
      np.testing.assert_array_equal(row_out, row_greedy)


def test_filter_logits_top_k_top_p_temperature():
  probs = np.asarray([[0.05, 0.5, 0.15, 0.3]])
  logits = jnp.asarray(np.log(probs), jnp.float32)

  def kept(temperature=1.0, top_k=0, top_p=1.0):
    out = np.asarray(filter_logits(logits, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))[0]
    return {i for i in range(4) if np.isfinite(out[i])}

  assert kept() == {0, 1, 2, 3}
  assert kept(top_k=2) == {1, 3}
  assert kept(top_k=10) == {0, 1, 2, 3}
  assert kept(top_p=0.7) == {1, 3}  # 0.5 < 0.7 <= 0.8
  assert kept(top_p=0.85) == {1, 2, 3}
  assert kept(top_p=0.01) == {1}
  assert kept(top_k=3, top_p=0.99) == {1, 2, 3}
  scaled = np.asarray(filter_logits(logits, jnp.float32(2.0), jnp.int32(0), jnp.float32(1.0)))
  np.testing.assert_allclose(scaled, np.log(probs) / 2, rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_softmax():
  probs = np.asarray([0.05, 0.5, 0.15, 0.3])
  logits = jnp.asarray(np.tile(np.log(probs), (20000, 1)), jnp.float32)
  draw = jax.jit(_next_token)
  counts = np.bincount(np.asarray(draw(logits, jax.random.key(0), 1.0, 0, 1.0)), minlength=4) / 20000
  np.testing.assert_allclose(counts, probs, atol=0.015)
  counts = np.bincount(np.asarray(draw(logits, jax.random.key(1), 1.0, 2, 1.0)), minlength=4) / 20000
  np.testing.assert_allclose(counts, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.015)
  np.testing.assert_array_equal(np.asarray(draw(logits, jax.random.key(2), 0.0, 0, 1.0)), 1)  # greedy


def test_prompt_bucket():
  assert [prompt_bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[[1] * 60], max_new_tokens=5), "max_new_tokens: a prompt of 60 tokens plus 5 new tokens exceeds model.max_seq_len=64"),
    (dict(prompts=[[1], []], max_new_tokens=5), "prompts: expected non-empty prompts"),
    (dict(prompts=[[1, 256]], max_new_tokens=5), r"prompts: expected token ids in \[0, 256\)"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens: expected a positive integer"),
    (dict(prompts=[[1]], max_new_tokens=2, top_p=0.0), r"top_p: expected a number in \(0, 1\]"),
    (dict(prompts=[[1]], max_new_tokens=2, temperature=-1.0), "temperature: expected a number >= 0"),
])
def test_generate_errors_name_the_argument(model_and_cfg, kwargs, message):
  model, _ = model_and_cfg
  with pytest.raises(ConfigError, match=message):
    generate(model, **kwargs)
