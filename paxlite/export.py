"""Hugging Face Llama checkpoints out (`export_hf`) and in (`import_hf`).

paxlite's model is the Llama architecture, so conversion is a renaming plus reshapes:

* Rotary embedding: paxlite rotates the half-split pairs (i, i + head_dim/2), which is what
  HF's `rotate_half` does, so q/k projections need no row permutation (the logits test in
  tests/test_export.py checks this against transformers). Checkpoints converted from Meta's
  original interleaved layout were already permuted into this one by HF's converter.
* Projections: HF's nn.Linear stores [out, in]; paxlite's kernels are [in..., out...] with
  heads as their own dimensions: q [d, heads, head_dim] <-> q_proj [heads*head_dim, d],
  o [heads, head_dim, d] <-> o_proj [d, heads*head_dim]. GQA needs nothing more: both
  sides group query head n with key/value head n // (heads / kv_heads).
* The stacked `layers` axis becomes model.layers.N.*; RMSNorm epsilon, rope theta,
  tied embeddings and kv heads map to config.json keys.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from paxlite.config import Config, ConfigError, ModelConfig, apply_overrides, config_from_dict, read_yaml, validate

# (HF name under model.layers.N., paxlite path under blocks, leading input dims of the
# paxlite kernel: reshaped to [in, out] and transposed; None: copied as is).
_LAYER = (
    ("input_layernorm.weight", ("attn_norm", "scale"), None),
    ("self_attn.q_proj.weight", ("attn", "q", "kernel"), 1),
    ("self_attn.k_proj.weight", ("attn", "k", "kernel"), 1),
    ("self_attn.v_proj.weight", ("attn", "v", "kernel"), 1),
    ("self_attn.o_proj.weight", ("attn", "o", "kernel"), 2),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), None),
    ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), 1),
    ("mlp.up_proj.weight", ("mlp", "up", "kernel"), 1),
    ("mlp.down_proj.weight", ("mlp", "down", "kernel"), 1),
)
_GLOBAL = (
    ("model.embed_tokens.weight", ("embed", "embedding"), None),
    ("model.norm.weight", ("final_norm", "scale"), None),
    ("lm_head.weight", ("head", "kernel"), 1),
)
# Buffers some older checkpoints carry; recomputed by every implementation.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _to_hf(x: np.ndarray, n_in: int | None) -> np.ndarray:
  if n_in is None:
    return np.ascontiguousarray(x)
  return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)


def _from_hf(w: np.ndarray, n_in: int | None, shape: tuple[int, ...]) -> np.ndarray:
  return w.reshape(shape) if n_in is None else w.T.reshape(shape)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_hf_tensors(params: dict, model_cfg: ModelConfig) -> dict[str, np.ndarray]:
  """paxlite parameters (a pure nested dict of host arrays) -> HF Llama state dict."""
  out = {}
  for name, path, n_in in _GLOBAL:
    if path[0] == "head" and model_cfg.tie_embeddings:
      continue
    out[name] = _to_hf(np.asarray(_get(params, path)), n_in)
  for name, path, n_in in _LAYER:
    stacked = np.asarray(_get(params["blocks"], path))
    for i in range(model_cfg.num_layers):
      out[f"model.layers.{i}.{name}"] = _to_hf(stacked[i], n_in)
  return out


def from_hf_tensors(tensors: dict[str, np.ndarray], like: dict, source: str) -> dict:
  """HF Llama state dict -> paxlite parameters with the shapes and dtypes of `like` (a pure
  dict of arrays or ShapeDtypeStructs). Missing, misshapen or unknown tensors are errors."""
  params: dict = {}
  used = set()

  def take(name: str, n_in: int | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if name not in tensors:
      raise ConfigError(f"{source}: tensor '{name}' is missing")
    w = tensors[name]
    expected = _to_hf(np.empty(shape, np.int8), n_in).shape
    if tuple(w.shape) != expected:
      raise ConfigError(f"{source}: tensor '{name}' has shape {tuple(w.shape)}, config.json implies {expected}")
    used.add(name)
    return _from_hf(np.asarray(w), n_in, shape).astype(dtype)

  for name, path, n_in in _GLOBAL:
    if path[0] == "head" and "head" not in like:
      used.add(name)  # tied: some checkpoints store a copy of the embedding anyway
      continue
    target = _get(like, path)
    _set(params, path, take(name, n_in, tuple(target.shape), target.dtype))
  for name, path, n_in in _LAYER:
    target = _get(like["blocks"], path)
    layers = [take(f"model.layers.{i}.{name}", n_in, tuple(target.shape[1:]), target.dtype)
              for i in range(target.shape[0])]
    _set(params, ("blocks",) + path, np.stack(layers))
  unknown = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES))
  if unknown:
    raise ConfigError(f"{source}: tensors paxlite's Llama model has no place for: {', '.join(unknown[:5])}"
                      + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
  return params


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------


def hf_config(model_cfg: ModelConfig, dtype: str, eos_id: int | None) -> dict[str, Any]:
  """config.json of the equivalent transformers LlamaForCausalLM."""
  m = model_cfg
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": m.vocab_size,
      "hidden_size": m.d_model,
      "intermediate_size": m.d_ff,
      "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads or m.num_heads,
      "head_dim": m.head_dim or m.d_model // m.num_heads,
      "hidden_act": "silu",
      "max_position_embeddings": m.max_seq_len or m.seq_len,
      "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": m.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "attention_dropout": 0.0,
      "initializer_range": m.init_std,
      "bos_token_id": None,
      "eos_token_id": eos_id,
      "torch_dtype": dtype,
  }


def model_overrides_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """config.json -> model.* keys; refuses what paxlite's model does not implement."""
  arch = hf.get("architectures") or []
  if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
    raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} / architectures {arch} is not a Llama "
                      f"(LlamaForCausalLM) checkpoint")
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
    if not isinstance(hf.get(key), int):
      raise ConfigError(f"{source}: '{key}' is missing or not an integer")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (paxlite's MLP is SwiGLU: silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ConfigError(f"{source}: {key}=true is not supported (paxlite's projections have no biases)")
  # transformers >= 5 writes rope settings as rope_parameters; older files as rope_theta/rope_scaling.
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ConfigError(f"{source}: rope scaling {scaling} is not supported (plain rotary embeddings only)")
  heads = hf["num_attention_heads"]
  return {
      "model.num_layers": hf["num_hidden_layers"],
      "model.d_model": hf["hidden_size"],
      "model.num_heads": heads,
      "model.num_kv_heads": hf.get("num_key_value_heads") or heads,
      "model.head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "model.d_ff": hf["intermediate_size"],
      "model.vocab_size": hf["vocab_size"],
      "model.max_seq_len": hf.get("max_position_embeddings"),
      "model.rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
  }


# ---------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table, which `tokenizers`' ByteLevel
  pre-tokenizer uses: printable Latin-1 bytes map to themselves, the rest to 256 + n."""
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def byte_tokenizer_json() -> str:
  """A `tokenizers` tokenizer.json that encodes exactly like paxlite's byte tokenizer (token
  id = UTF-8 byte value): a byte-level BPE with the 256 bytes as vocabulary and no merges."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return tok.to_str()


def _write_tokenizer(cfg: Config, out_dir: str, max_len: int) -> int | None:
  """tokenizer.json (+ tokenizer_config.json for AutoTokenizer); returns the eos id."""
  from paxlite.data import load_tokenizer

  tokenizer = load_tokenizer(cfg.data.tokenizer)
  if cfg.data.tokenizer == "byte":
    text = byte_tokenizer_json()
  else:
    with open(tokenizer.path, encoding="utf-8") as f:
      text = f.read()
  with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write(text)
  eos_id = tokenizer.eos_id
  tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                "clean_up_tokenization_spaces": False}
  if eos_id is not None:
    from tokenizers import Tokenizer

    tok_config["eos_token"] = Tokenizer.from_str(text).id_to_token(eos_id)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(tok_config, f, indent=2)
  return eos_id


# ---------------------------------------------------------------------------------------
# Export and import
# ---------------------------------------------------------------------------------------


def _fresh_dir(path: str, what: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ConfigError(f"{what}: '{path}' already exists and is not an empty directory")


def export_hf(model: Any, cfg: Config, out_dir: str) -> list[str]:
  """Writes a transformers-loadable Llama checkpoint of `model` (paxlite's Transformer, or its
  parameters as a pure dict) into `out_dir` (new or empty): config.json, model.safetensors,
  tokenizer.json and tokenizer_config.json; returns the file names. Written into a
  temporary sibling, then renamed: never half-written."""
  import jax
  from flax import nnx
  from safetensors.numpy import save_file

  from paxlite.models.build import pure_dict

  _fresh_dir(out_dir, "OUT_DIR")
  params = jax.device_get(pure_dict(nnx.state(model)) if isinstance(model, nnx.Module) else model)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".paxlite-export-")
  try:
    tensors = to_hf_tensors(params, cfg.model)
    dtype = str(next(iter(tensors.values())).dtype)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    eos_id = _write_tokenizer(cfg, tmp, cfg.model.max_seq_len or cfg.model.seq_len)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf_config(cfg.model, dtype, eos_id), f, indent=2)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return sorted(os.listdir(out_dir))


def read_hf(hf_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, tensors) of a local HF checkpoint: model.safetensors or the shards named
  by model.safetensors.index.json."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  if not os.path.isdir(hf_dir):
    raise ConfigError(f"HF_DIR: '{hf_dir}' is not a directory")
  config_path = os.path.join(hf_dir, "config.json")
  try:
    with open(config_path, encoding="utf-8") as f:
      hf = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"HF_DIR: '{hf_dir}' holds no config.json") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"{config_path}: not a readable JSON file ({' '.join(str(e).split())})") from None
  single, index = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = sorted({os.path.join(hf_dir, name) for name in json.load(f)["weight_map"].values()})
  else:
    raise ConfigError(f"HF_DIR: '{hf_dir}' holds neither model.safetensors nor model.safetensors.index.json "
                      f"(PyTorch .bin checkpoints are not read)")
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    try:
      tensors.update(load_file(path))
    except (OSError, SafetensorError) as e:
      raise ConfigError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
  return hf, tensors


def import_config(hf: dict[str, Any], config_path: str | None, overrides: list[str] | dict | None,
                  hf_dir: str) -> Config:
  """The run's config: `config_path` with `overrides`, its model.* keys taken from config.json."""
  data = read_yaml(config_path) if config_path else {}
  data = apply_overrides(apply_overrides(data, overrides or {}),
                         model_overrides_from_hf(hf, os.path.join(hf_dir, "config.json")))
  cfg = config_from_dict(data)
  if cfg.model.max_seq_len is not None and cfg.model.seq_len > cfg.model.max_seq_len:
    raise ConfigError(f"model.seq_len: {cfg.model.seq_len} exceeds the checkpoint's max_position_embeddings="
                      f"{cfg.model.max_seq_len} ({os.path.join(hf_dir, 'config.json')}); set model.seq_len lower")
  validate(cfg)
  return cfg


def import_hf(hf_dir: str, config_path: str | None = None, overrides: list[str] | dict | None = None) -> Config:
  """Makes a new run directory (run.dir) that starts from a HF Llama checkpoint's weights:
  config.yaml (model.* from config.json, everything else from `config_path` and
  `overrides`), checkpoints/0 (the weights and a fresh optimizer state) and, when HF_DIR
  has one and data.tokenizer is `byte`, its tokenizer.json (which data.tokenizer then names).
  `paxlite train RUN_DIR/config.yaml` then trains from step 0."""
  import jax
  import jax.numpy as jnp

  from paxlite.trainer import Trainer

  hf, tensors = read_hf(hf_dir)
  cfg = import_config(hf, config_path, overrides, hf_dir)
  run_dir = cfg.run.dir
  _fresh_dir(run_dir, "run.dir")
  hf_tokenizer = os.path.join(hf_dir, "tokenizer.json")
  use_hf_tokenizer = cfg.data.tokenizer == "byte" and os.path.isfile(hf_tokenizer)
  if use_hf_tokenizer:
    cfg.data.tokenizer = os.path.abspath(os.path.join(run_dir, "tokenizer.json"))
  trainer = Trainer(cfg)  # checks the mesh and every parameter's sharding before writing
  params = from_hf_tensors(tensors, trainer.param_shapes, hf_dir)
  shardings = trainer.state_shardings
  params = jax.device_put(params, shardings["params"])
  opt_state = jax.jit(trainer.tx.init, out_shardings=shardings["opt_state"])(params)
  trainer.state = {"params": params, "opt_state": opt_state,
                   "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}
  os.makedirs(run_dir, exist_ok=True)
  if use_hf_tokenizer:
    shutil.copyfile(hf_tokenizer, cfg.data.tokenizer)
  with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
    f.write(cfg.to_yaml())
  trainer.save(force=True)
  trainer.checkpointer.close()
  return cfg
