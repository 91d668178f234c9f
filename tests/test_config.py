import glob
import os

import pytest

from paxlite.config import Config, ConfigError, ModelConfig, apply_overrides, load_config, parse_override

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def test_configs_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"tiny.yaml", "bench-1.7b.yaml", "gpt-125m.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_every_parameter_resolves(path):
  import jax

  from paxlite.trainer import Trainer

  cfg = load_config(path, {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1})
  trainer = Trainer(cfg)  # builds the abstract model and resolves every parameter's sharding
  assert trainer.num_params > 0
  flat = jax.tree.leaves(trainer.param_specs, is_leaf=lambda x: x.__class__.__name__ == "PartitionSpec")
  assert len(flat) == len(jax.tree.leaves(trainer.param_shapes))


def test_bench_config_is_the_reference_model(repo_root):
  cfg = load_config(os.path.join(repo_root, "configs", "bench-1.7b.yaml"))
  m = cfg.model
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff, m.vocab_size, m.seq_len) == (
      24, 2048, 16, 16, 8192, 50304, 2048)
  assert cfg.train.batch_size == 8
  assert (cfg.precision.params, cfg.precision.compute) == ("float32", "bfloat16")


def test_overrides_parse_yaml_scalars_and_lists():
  assert parse_override("train.lr=1e-3") == (["train", "lr"], "1e-3")
  assert parse_override("mesh.data=2") == (["mesh", "data"], 2)
  assert parse_override("model.tie_embeddings=true") == (["model", "tie_embeddings"], True)
  assert parse_override("rules=[[batch, data]]") == (["rules"], [["batch", "data"]])
  cfg = load_config(None, ["train.lr=1e-3", "mesh.data=2", "model.num_kv_heads=null"])
  assert cfg.train.lr == 1e-3 and cfg.mesh.data == 2 and cfg.model.num_kv_heads is None


def test_override_never_evaluates_python():
  _, value = parse_override("run.dir=__import__('os').getcwd()")
  assert value == "__import__('os').getcwd()"


def test_config_in_code_and_yaml_round_trip(tmp_path):
  cfg = Config(model=ModelConfig(num_layers=3, d_model=96, num_heads=3))
  path = tmp_path / "c.yaml"
  path.write_text(cfg.to_yaml())
  assert load_config(path) == cfg


def test_apply_overrides_does_not_mutate_input():
  data = {"train": {"steps": 3}}
  out = apply_overrides(data, {"train.steps": 5})
  assert data["train"]["steps"] == 3 and out["train"]["steps"] == 5


BAD = [
    (["trian.steps=3"], "unknown config key 'trian'"),
    (["train.stpes=3"], "unknown config key 'train.stpes'"),
    (["train.steps=abc"], "train.steps: expected int"),
    (["train.steps=1.5"], "train.steps: expected int"),
    (["train.lr=fast"], "train.lr: expected float"),
    (["model.d_model=-64"], "model.d_model: expected a positive"),
    (["train.batch_size=0"], "train.batch_size: expected a positive"),
    (["model.num_heads=5"], "model.num_heads: 5 does not divide model.d_model=64"),
    (["model.num_kv_heads=3"], "model.num_kv_heads: 3 must divide"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one of mesh"),
    (["mesh.tensor=0"], "mesh.tensor: expected a positive size"),
    (["precision.compute=float8"], "precision.compute: expected one of"),
    (["model.remat=sometimes"], "model.remat: expected one of"),
    (["train.grad_accum=3"], "train.grad_accum: 3 must divide train.batch_size=8"),
    (["rules=[[batch, gpu]]"], "unknown mesh axis 'gpu'"),
    (["rules=3"], "rules: expected a list"),
    (["train=5"], "train: expected a mapping"),
    (["train.steps"], "expected key=value"),
    (["model.seq_len=512", "model.max_seq_len=256"], "model.seq_len: 512 exceeds model.max_seq_len=256"),
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["run.compile_cache=off"], "run.compile_cache: expected a string, got False (YAML reads on/off"),
    (["run.compile_cache='off'"], "run.compile_cache: expected auto, none or a directory, got 'off'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_overrides_give_one_line_errors(overrides, message):
  with pytest.raises(ConfigError) as info:
    load_config(None, overrides)
  assert message in str(info.value)
  assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    load_config(tmp_path / "missing.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(bad)
  tagged = tmp_path / "tagged.yaml"
  tagged.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(tagged)
  listy = tmp_path / "list.yaml"
  listy.write_text("- 1\n- 2\n")
  with pytest.raises(ConfigError, match="expected a mapping"):
    load_config(listy)


def test_readme_documents_every_key(repo_root):
  from paxlite.config import describe_keys

  readme = open(os.path.join(repo_root, "README.md"), encoding="utf-8").read()
  for key, _, doc in describe_keys():
    assert f"| `{key}` |" in readme, f"README lacks config key {key}: run `paxlite keys --markdown`"
    assert doc, f"config key {key} has no docstring"


def test_default_xla_flags_are_added_but_never_override_the_user():
  from paxlite import xla_flags
  defaults = [f"{name}={value}" for name, value in xla_flags.DEFAULTS.items()]
  assert "--xla_gpu_all_reduce_combine_threshold_bytes=134217728" in defaults
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.apply_defaults(env) == defaults
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8"] + defaults
  assert xla_flags.apply_defaults(env) == []  # idempotent
  name = "--xla_gpu_all_gather_combine_threshold_bytes"
  mine = {"XLA_FLAGS": f"{name}=1024"}
  added = xla_flags.apply_defaults(mine)
  assert f"{name}=1024" in mine["XLA_FLAGS"].split() and not any(f.startswith(name) for f in added)
  assert len(added) == len(defaults) - 1
  empty: dict = {}
  xla_flags.apply_defaults(empty)
  assert empty["XLA_FLAGS"].split() == defaults
  assert xla_flags.apply_defaults(env, flags=xla_flags.COMPILE_ONLY) == ["--xla_backend_optimization_level=0"]
  mine = {"XLA_FLAGS": "--xla_backend_optimization_level=2"}
  assert xla_flags.apply_defaults(mine, flags=xla_flags.COMPILE_ONLY) == []  # a plan at the user's level


def test_simulated_cpu_devices_replace_any_device_count():
  from paxlite import xla_flags
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"}
  xla_flags.simulate_cpu_devices(64, env)
  assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=64"]
  assert env["JAX_PLATFORMS"] == "cpu"
