"""Hugging Face Llama interop: paxlite -> HF -> paxlite gives identical arrays, and transformers
computes paxlite's logits from the exported files (when torch and transformers are installed)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from paxlite.config import ConfigError, load_config
from paxlite.data import ByteTokenizer
from paxlite.export import byte_tokenizer_json, export_hf, from_hf_tensors, import_hf, read_hf, to_hf_tensors
from paxlite.runs import load_run
from paxlite.models.build import pure_dict
from paxlite.trainer import Trainer

BASE = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.d_ff": 128, "model.seq_len": 32,
    "model.init_std": 0.3, "precision.compute": "float32",
}
# Grouped-query attention both times; the second also has one kv head, a head_dim that is not
# d_model / num_heads, tied embeddings, and non-default rope theta and RMSNorm epsilon.
CASES = {
    "gqa": {"model.num_kv_heads": 2},
    "mqa_tied": {"model.num_kv_heads": 1, "model.head_dim": 8, "model.tie_embeddings": True,
                 "model.rope_theta": 500.0, "model.norm_eps": 1e-3},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """name -> (cfg, host params, logits of a fixed batch, export directory)."""
  out = {}
  tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
  for name, overrides in CASES.items():
    cfg = load_config(None, {**BASE, **overrides})
    trainer = Trainer(cfg)
    trainer.state = trainer.init_state()
    params = jax.device_get(trainer.state["params"])
    logits = np.asarray(trainer.model()(jnp.asarray(tokens)))
    hf_dir = str(tmp_path_factory.mktemp(name) / "hf")
    files = export_hf(trainer.model(), cfg, hf_dir)  # a model; the other tests pass params
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    out[name] = (cfg, params, tokens, logits, hf_dir)
  return out


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_names_and_round_trip(exported, name):
  cfg, params, _, _, _ = exported[name]
  tensors = to_hf_tensors(params, cfg.model)
  assert ("lm_head.weight" in tensors) == (not cfg.model.tie_embeddings)
  assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (4 * (cfg.model.head_dim or 16), 64)
  assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (cfg.model.num_kv_heads * (cfg.model.head_dim or 16), 64)
  assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
  assert len(tensors) == 2 * 9 + 2 + (not cfg.model.tie_embeddings)
  assert_trees_equal(from_hf_tensors(tensors, params, "test"), params)


@pytest.mark.parametrize("name", list(CASES))
def test_config_json(exported, name):
  cfg, _, _, _, hf_dir = exported[name]
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf = json.load(f)
  m = cfg.model
  assert hf["architectures"] == ["LlamaForCausalLM"]
  assert (hf["num_key_value_heads"], hf["head_dim"], hf["rope_theta"], hf["rms_norm_eps"], hf["tie_word_embeddings"]) == (
      m.num_kv_heads, m.head_dim or 16, m.rope_theta, m.norm_eps, m.tie_embeddings)


def test_paxlite_hf_paxlite_gives_identical_arrays(exported, tmp_path):
  cfg, params, tokens, logits, hf_dir = exported["mqa_tied"]
  config = tmp_path / "train.yaml"
  config.write_text(yaml.safe_dump({"train": {"steps": 5, "batch_size": 8}, "model": {"seq_len": 32, "init_std": 0.3},
                                    "precision": {"compute": "float32"}}))
  run_dir = tmp_path / "run"
  imported = import_hf(hf_dir, str(config), [f"run.dir={run_dir}", "mesh.data=1", "mesh.fsdp=8"])
  # Every model key comes from config.json (max_position_embeddings: the exported seq_len).
  assert imported.model == dataclasses.replace(cfg.model, max_seq_len=32) and imported.train.steps == 5
  assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.yaml", "tokenizer.json"]
  assert os.listdir(run_dir / "checkpoints") == ["0"]
  assert imported.data.tokenizer == str(run_dir / "tokenizer.json")
  model, loaded = load_run(str(run_dir), overrides=["mesh.fsdp=2"])  # another mesh than the import
  assert loaded.model == imported.model
  assert_trees_equal(jax.device_get(pure_dict(nnx.state(model))), params)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), logits, rtol=1e-4, atol=1e-4)


def test_sharded_safetensors_are_read(exported, tmp_path):
  from safetensors.numpy import save_file

  _, _, _, _, hf_dir = exported["gqa"]
  _, tensors = read_hf(hf_dir)
  names = sorted(tensors)
  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  shutil.copy(os.path.join(hf_dir, "config.json"), shard_dir)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    file = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, str(shard_dir / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, read_back = read_hf(str(shard_dir))
  assert_trees_equal(read_back, tensors)


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_computes_the_same_logits(exported, name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, _, tokens, logits, hf_dir = exported[name]
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
  assert type(model).__name__ == "LlamaForCausalLM"
  with torch.no_grad():
    hf_logits = model(torch.tensor(tokens)).logits.numpy()
  assert np.abs(logits).max() > 3  # logits with real spread: a layout mistake would show
  np.testing.assert_allclose(hf_logits, logits, rtol=0, atol=1e-4)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  text = "def f(x):\n  return 'héllo' + \"😀\"\t"
  assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text).tolist()


def test_byte_tokenizer_json_encodes_like_the_byte_tokenizer():
  from tokenizers import Tokenizer

  tok = Tokenizer.from_str(byte_tokenizer_json())
  assert tok.get_vocab_size() == 256
  for text in ["hello world", "  two  spaces\n\n", "\x00\x01\x7f control", "ünïcödé ∑ 😀 中文", "\r\n\t"]:
    ids = tok.encode(text).ids
    assert ids == ByteTokenizer().encode(text).tolist()
    assert tok.decode(ids) == text


def test_export_copies_a_tokenizers_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  words = ["<unk>", "</s>", "the", "quick", "fox"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok_path = tmp_path / "tokenizer.json"
  tok.save(str(tok_path))
  cfg = load_config(None, {**BASE, "data.tokenizer": str(tok_path)})
  trainer = Trainer(cfg)
  params = jax.device_get(trainer.init_state()["params"])
  export_hf(params, cfg, str(tmp_path / "hf"))
  assert (tmp_path / "hf" / "tokenizer.json").read_text() == tok_path.read_text()
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 1
  assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


def test_export_refuses_a_non_empty_directory(exported, tmp_path):
  cfg, params, _, _, _ = exported["gqa"]
  (tmp_path / "keep.txt").write_text("precious")
  with pytest.raises(ConfigError, match="OUT_DIR: '.*' already exists and is not an empty directory"):
    export_hf(params, cfg, str(tmp_path))
  assert os.listdir(tmp_path) == ["keep.txt"]


def _edit_config(hf_dir, **changes):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(path, "w") as f:
    json.dump(hf, f)


def _edit_tensors(hf_dir, drop=None, add=None):
  from safetensors.numpy import save_file

  _, tensors = read_hf(hf_dir)
  tensors.pop(drop, None)
  tensors.update(add or {})
  save_file(tensors, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda d: _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]), "is not a Llama"),
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope scaling .* is not supported"),
    (lambda d: _edit_config(d, attention_bias=True), "attention_bias=true is not supported"),
    (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (lambda d: _edit_config(d, intermediate_size=96), r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\), config.json implies \(96, 64\)"),
    (lambda d: _edit_tensors(d, drop="model.layers.1.self_attn.v_proj.weight"), "'model.layers.1.self_attn.v_proj.weight' is missing"),
    (lambda d: _edit_tensors(d, add={"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
     "no place for: model.layers.0.self_attn.q_proj.bias"),
    (lambda d: os.remove(os.path.join(d, "model.safetensors")), "holds neither model.safetensors"),
    (lambda d: os.remove(os.path.join(d, "config.json")), "holds no config.json"),
])
def test_import_errors_name_the_problem_and_write_nothing(exported, tmp_path, edit, message):
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(exported["gqa"][4], hf_dir)
  edit(hf_dir)
  run_dir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):
    import_hf(hf_dir, None, [f"run.dir={run_dir}", "model.seq_len=32"])
  assert not run_dir.exists()


def test_import_checks_seq_len_against_the_checkpoint(exported, tmp_path):
  with pytest.raises(ConfigError, match=r"model.seq_len: 128 exceeds the checkpoint's max_position_embeddings=32"):
    import_hf(exported["gqa"][4], None, [f"run.dir={tmp_path / 'run'}"])


def test_import_refuses_an_existing_run_directory(exported, tmp_path):
  (tmp_path / "keep.txt").write_text("precious")
  with pytest.raises(ConfigError, match="run.dir: '.*' already exists and is not an empty directory"):
    import_hf(exported["gqa"][4], None, [f"run.dir={tmp_path}", "model.seq_len=32"])
  assert os.listdir(tmp_path) == ["keep.txt"]
