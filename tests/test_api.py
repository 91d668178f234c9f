"""The Python API: paxlite.load_config / make_mesh / build_model / Trainer / explain_sharding,
the `paxlite shardings` command, and a user's own NNX module trained by the same Trainer."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import paxlite
from paxlite import cli

TINY = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 16,
    "train.lr": 1e-2, "train.warmup_steps": 1, "train.steps": 3,
}
D2F2T2 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def batches(n=3, batch=16, seq=32, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 16, (batch, seq + 1)).astype(np.int32) for _ in range(n)]


def shard_shape(x):
  return x.addressable_shards[0].data.shape


# ---------------------------------------------------------------------------------------
# config, mesh, build_model
# ---------------------------------------------------------------------------------------


def test_import_paxlite_does_not_import_jax(repo_root):
  code = "import sys, paxlite; paxlite.load_config(None); print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, check=True)
  assert out.stdout.strip() == "False"


def test_load_config_and_config_in_code(repo_root):
  cfg = paxlite.load_config(os.path.join(repo_root, "configs", "tiny.yaml"), overrides={"mesh.data": 2, "mesh.fsdp": 4})
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.model.d_model) == (2, 4, 128)
  in_code = paxlite.Config(model=paxlite.ModelConfig(d_model=96, num_heads=3), mesh=paxlite.MeshConfig(data=8))
  assert in_code.model.d_model == 96 and in_code.rules == [list(r) for r in paxlite.DEFAULT_RULES]
  with pytest.raises(paxlite.ConfigError, match="unknown config key 'mesh.gpus'"):
    paxlite.load_config(None, overrides={"mesh.gpus": 2})


def test_make_mesh_takes_a_config_or_its_mesh_section():
  cfg = paxlite.load_config(None, D2F2T2)
  mesh = paxlite.make_mesh(cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "stage": 1, "tensor": 2}
  assert paxlite.make_mesh(cfg.mesh).devices.tolist() == mesh.devices.tolist()
  with pytest.raises(paxlite.ConfigError, match="makes 4 devices, but there are 8"):
    paxlite.make_mesh(paxlite.load_config(None, {"mesh.data": 4}))


@pytest.fixture(scope="module")
def sharded_trainer():
  cfg = paxlite.load_config(None, {**TINY, **D2F2T2})
  trainer = paxlite.Trainer(cfg)
  trainer.state = trainer.init_state()
  return trainer


def test_build_model_is_sharded_and_starts_where_the_trainer_starts(sharded_trainer):
  cfg, mesh = sharded_trainer.cfg, sharded_trainer.mesh
  model = paxlite.build_model(cfg, mesh)
  q = model.blocks.attn.q.kernel[...]
  assert q.sharding.spec == P("stage", "fsdp", "tensor", None)  # stage has size 1 here
  assert shard_shape(q) == (2, 32, 2, 16)
  params = nnx.to_pure_dict(nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(sharded_trainer.state["params"]))
  assert jax.tree.map(lambda x: x.sharding, params) == jax.tree.map(lambda x: x.sharding,
                                                                    sharded_trainer.state["params"])


def test_build_model_logits_equal_single_device(sharded_trainer):
  cfg = sharded_trainer.cfg
  tokens = jnp.asarray(batches(n=1)[0][:, :-1])
  logits = paxlite.build_model(cfg, sharded_trainer.mesh)(tokens)
  single = paxlite.build_model(cfg, paxlite.make_mesh(paxlite.load_config(None, {**TINY, "mesh.data": 1}),
                                                      jax.devices()[:1]))
  assert logits.shape == (16, 32, 256) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, single(tokens), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# explain_sharding and `paxlite shardings`
# ---------------------------------------------------------------------------------------


def test_explain_sharding_matches_the_trainers_arrays(sharded_trainer):
  table = paxlite.explain_sharding(sharded_trainer.cfg)
  state = sharded_trainer.state
  params = dict(jax.tree_util.tree_flatten_with_path(state["params"])[0])
  assert len(table.params) == len(params) == 12
  for row in table.params:
    array = params[tuple(jax.tree_util.DictKey(k) for k in row.name.split("."))]
    assert row.spec == array.sharding.spec, row.name
    assert row.local_shape == shard_shape(array), row.name
    assert row.shape == array.shape and row.dtype == "float32"
  assert table.num_params == sharded_trainer.num_params
  on_device0 = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                                if s.device == jax.devices()[0])
  assert table.param_bytes_per_device == on_device0(state["params"])
  assert table.opt_state_bytes_per_device == on_device0(state["opt_state"])
  q = table.param("blocks.attn.q.kernel")
  assert q.mesh_axes == ("-", "fsdp", "tensor", "-") and q.local_bytes == 2 * 32 * 2 * 16 * 4


def test_explain_sharding_activations_are_the_layouts_the_step_uses(sharded_trainer):
  table = paxlite.explain_sharding(sharded_trainer.cfg)
  acts = {row.logical: row for row in table.activations}
  assert table.activations[0].logical == ("batch", "length") and table.activations[0].dtype == "int32"
  residual = acts[("batch", "length", "act_embed")]
  assert residual.mesh_axes == ("data+fsdp", "-", "-") and residual.local_shape == (4, 32, 64)
  assert acts[("batch", "length", "act_mlp")].local_shape == (4, 32, 64)
  assert acts[("batch", "length", "act_heads", "head_dim")].local_shape == (4, 32, 2, 16)
  # The logits of a real sharded forward pass are laid out as the table says.
  logits_row = acts[("batch", "length", "act_vocab")]
  trainer = sharded_trainer
  with trainer.activate():
    logits = jax.jit(lambda p, t: trainer.model(p)(t))(trainer.state["params"], jnp.zeros((16, 32), jnp.int32))
  assert logits.sharding.spec == logits_row.spec and shard_shape(logits) == logits_row.local_shape


def test_explain_sharding_needs_no_devices_and_prints_a_table():
  # 64 devices on a host with 8: only the mesh's axis sizes matter.
  cfg = paxlite.load_config(None, {**TINY, "mesh.data": 4, "mesh.fsdp": 4, "mesh.tensor": 4, "train.batch_size": 32,
                                   "model.num_kv_heads": 4})
  table = paxlite.explain_sharding(cfg)
  assert table.mesh_shape == {"data": 4, "fsdp": 4, "stage": 1, "tensor": 4}
  assert table.param("blocks.mlp.down.kernel").local_shape == (2, 32, 16)
  text = str(table)
  assert text.startswith("mesh data=4 fsdp=4 stage=1 tensor=4 (64 devices)")
  line = next(l for l in text.splitlines() if l.startswith("blocks.attn.q.kernel"))
  assert line.split()[1:6] == ["layers,", "embed,", "heads,", "head_dim", "-,"]
  assert "[2, 16, 1, 16]" in line
  # By hand: 2 layers x (4 x 64 x 64 attention + 3 x 64 x 128 MLP + 2 x 64 norms) + 64 + 2 x 256 x 64;
  # per device: 2 x (4 x 512 + 3 x 1024 + 256) + 64 + 2 x 1024 = 7488 floats.
  assert "parameters: 115,008 (449.25 KiB); per device 29.25 KiB" in text
  # -1 takes the given device count
  table = paxlite.explain_sharding(paxlite.load_config(None, {**TINY, "mesh.fsdp": 2}), num_devices=16)
  assert table.mesh_shape["data"] == 8


def test_explain_sharding_errors_name_the_key():
  with pytest.raises(paxlite.ConfigError, match=r"train.batch_size / train.grad_accum = 16 sequences.*size 32"):
    paxlite.explain_sharding(paxlite.load_config(None, {**TINY, "mesh.data": 32}))
  with pytest.raises(paxlite.ConfigError, match="makes 8 devices, but there are 4 devices"):
    paxlite.explain_sharding(paxlite.load_config(None, {**TINY, "mesh.data": 8}), num_devices=4)


def test_cli_shardings_prints_the_table(repo_root, capsys):
  tiny = os.path.join(repo_root, "configs", "tiny.yaml")
  code = cli.main(["shardings", tiny, "mesh.data=2", "mesh.fsdp=4"])
  assert code == 0
  out = capsys.readouterr().out
  assert out.startswith("mesh data=2 fsdp=4 stage=1 tensor=1 (8 devices)")
  line = next(l for l in out.splitlines() if l.startswith("embed.embedding"))
  assert "[256, 128]" in line and "[256, 32]" in line
  code = cli.main(["shardings", tiny, "mesh.tensor=2", "train.batch_size=128", "--devices", "256"])
  assert code == 0 and "(256 devices)" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["mesh.tensor=4"], "dimension 2 ('kv_heads', size 2) is not divisible by mesh axes tensor of size 4"),
    (["--devices", "0"], "--devices: expected a positive number of devices, got 0"),
    (["mesh.data=3", "--devices", "8"], "makes 3 devices, but there are 8 devices"),
    (["trian.steps=1"], "unknown config key 'trian'"),
])
def test_cli_shardings_errors_are_one_line(repo_root, args, message):
  proc = subprocess.run([sys.executable, "-m", "paxlite", "shardings", "configs/tiny.yaml", *args],
                        capture_output=True, text=True, cwd=repo_root)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip().splitlines() == [f"paxlite: error: {proc.stderr.strip()[len('paxlite: error: '):]}"]
  assert message in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------
# A user's own module: annotated with logical names, trained by the same Trainer and rules.
# ---------------------------------------------------------------------------------------


class PrefixMixerLM(nnx.Module):
  """A small causal LM that is not paxlite's Transformer: each position adds the mean of its
  prefix's embeddings, then a GELU MLP with its own logical axis 'hidden', then an output head."""

  def __init__(self, vocab: int, d: int, hidden: int, *, rngs: nnx.Rngs):
    normal = nnx.initializers.normal(0.02)
    zeros = nnx.initializers.zeros
    self.embed = nnx.Embed(vocab, d, embedding_init=nnx.with_partitioning(normal, ("vocab", "embed")), rngs=rngs)
    self.up = nnx.Linear(d, hidden, kernel_init=nnx.with_partitioning(normal, ("embed", "hidden")),
                         bias_init=nnx.with_partitioning(zeros, ("hidden",)), rngs=rngs)
    self.down = nnx.Linear(hidden, d, kernel_init=nnx.with_partitioning(normal, ("hidden", "embed")),
                           bias_init=nnx.with_partitioning(zeros, ("embed",)), rngs=rngs)
    self.head = nnx.Linear(d, vocab, use_bias=False, kernel_init=nnx.with_partitioning(normal, ("embed", "vocab")),
                           rngs=rngs)

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    x_btd = paxlite.constrain(self.embed(tokens_bt), ("batch", "length", "act_embed"))
    count_t = jnp.arange(1, tokens_bt.shape[1] + 1, dtype=jnp.float32)
    x_btd = x_btd + jnp.cumsum(x_btd, axis=1) / count_t[None, :, None]
    h_btf = paxlite.constrain(jax.nn.gelu(self.up(x_btd)), ("batch", "length", "act_hidden"))
    x_btd = x_btd + self.down(h_btf)
    return self.head(x_btd)


CUSTOM_RULES = [["hidden", "tensor"], ["act_hidden", "tensor"]] + [list(r) for r in paxlite.DEFAULT_RULES]


def custom_model_fn(rngs: nnx.Rngs) -> nnx.Module:
  return PrefixMixerLM(256, 64, 128, rngs=rngs)


def custom_trainer(mesh_overrides, devices=None, **overrides):
  cfg = paxlite.load_config(None, {**TINY, "rules": CUSTOM_RULES, "train.steps": 4, **mesh_overrides, **overrides})
  mesh = paxlite.make_mesh(cfg, devices)
  return paxlite.Trainer(cfg, model_fn=custom_model_fn, mesh=mesh)


@pytest.fixture(scope="module")
def custom_runs():
  sharded = custom_trainer(D2F2T2)
  single = custom_trainer({"mesh.data": 1}, jax.devices()[:1])
  data = batches(n=4)
  return {name: (t, [float(t.step(b)["loss"]) for b in data]) for name, t in [("sharded", sharded), ("single", single)]}


def test_custom_module_trains_sharded_with_single_device_numbers(custom_runs):
  trainer, losses = custom_runs["sharded"]
  _, single = custom_runs["single"]
  np.testing.assert_allclose(losses, single, rtol=1e-5)
  assert losses[0] == pytest.approx(np.log(256), abs=0.05) and losses[-1] < losses[0] - 0.2
  up = trainer.state["params"]["up"]["kernel"]
  assert up.sharding.spec == P("fsdp", "tensor") and shard_shape(up) == (32, 64)
  assert shard_shape(trainer.state["params"]["up"]["bias"]) == (64,)
  assert trainer.logical_names["down"]["kernel"] == ("hidden", "embed")
  assert trainer.flops_per_token == 6.0 * trainer.num_params == 6.0 * (256 * 64 * 2 + 64 * 128 * 2 + 128 + 64)


def test_custom_module_in_explain_sharding_and_build_model(custom_runs):
  trainer, _ = custom_runs["sharded"]
  table = paxlite.explain_sharding(trainer.cfg, model_fn=custom_model_fn)
  assert table.param("up.kernel").mesh_axes == ("fsdp", "tensor")
  hidden = next(r for r in table.activations if r.logical == ("batch", "length", "act_hidden"))
  assert hidden.local_shape == (4, 32, 64)
  model = paxlite.build_model(trainer.cfg, trainer.mesh, model_fn=custom_model_fn)
  assert model(jnp.zeros((8, 32), jnp.int32)).shape == (8, 32, 256)


def test_unannotated_custom_parameter_is_an_error_naming_it():
  class Bare(nnx.Module):
    def __init__(self, rngs):
      init = nnx.with_partitioning(nnx.initializers.normal(), ("vocab", "embed"))
      self.embed = nnx.Embed(256, 64, embedding_init=init, rngs=rngs)
      self.out = nnx.Linear(64, 256, use_bias=False, rngs=rngs)

  cfg = paxlite.load_config(None, TINY)
  with pytest.raises(paxlite.ConfigError, match=r"parameter 'out.kernel' \(64, 256\): has no logical axis names"):
    paxlite.Trainer(cfg, model_fn=lambda rngs: Bare(rngs))
  with pytest.raises(paxlite.ConfigError, match="no partition rule for logical axis 'hidden'"):
    paxlite.explain_sharding(cfg, model_fn=custom_model_fn)


def test_custom_module_full_loop_streams_records(tmp_path, data_cache):
  run = {"train.log_every": 1, "eval.every": 2, "eval.batches": 1, "data.max_files": 30, "run.tensorboard": False,
         "checkpoint.every": 0}
  streamed = []
  trainer = custom_trainer(D2F2T2, **{"run.dir": str(tmp_path / "a"), **run})
  for record in trainer.train_iter(steps=4):
    streamed.append(record)
    # each record arrives while training goes on: it is already in metrics.jsonl
    with open(tmp_path / "a" / "metrics.jsonl") as f:
      assert json.loads(f.readlines()[-1])["step"] == record["step"]
  assert [r["step"] for r in streamed] == [1, 2, 3, 4] and "eval_loss" in streamed[1]
  assert os.listdir(tmp_path / "a" / "checkpoints") == ["4"]
  listed = custom_trainer(D2F2T2, **{"run.dir": str(tmp_path / "b"), **run}).train(steps=4)
  np.testing.assert_array_equal([r["loss"] for r in listed], [r["loss"] for r in streamed])
  # Leaving the loop early stops training there.
  early = custom_trainer(D2F2T2, **{"run.dir": str(tmp_path / "c"), **run})
  for record in early.train_iter(steps=4):
    if record["step"] == 2:
      break
  assert int(early.state["step"]) == 2
