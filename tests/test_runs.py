"""Run directories after training: load_run, evaluation, and the sample/eval/export/import-hf CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from paxlite import cli
from paxlite.config import ConfigError, load_config
from paxlite.data import ByteTokenizer
from paxlite.evaluation import evaluate
from paxlite.models.build import pure_dict
from paxlite.runs import load_run
from paxlite.sample import generate
from paxlite.trainer import Trainer

RUN = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 128, "model.seq_len": 32, "precision.compute": "float32", "train.batch_size": 8,
    "train.lr": 3e-3, "train.warmup_steps": 2, "train.steps": 4, "train.log_every": 1, "data.max_files": 20,
    "eval.every": 4, "eval.batches": 3, "checkpoint.every": 2, "run.tensorboard": False,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
  run_dir = str(tmp_path_factory.mktemp("trained"))
  trainer = Trainer(load_config(None, {**RUN, "run.dir": run_dir}))
  history = trainer.train()
  trainer.checkpointer.close()
  return run_dir, history, jax.device_get(trainer.state["params"])


@pytest.fixture(scope="module")
def loaded(trained):
  return load_run(trained[0])


def params_of(model):
  return jax.device_get(pure_dict(nnx.state(model)))


def test_load_run_restores_the_last_parameters_on_the_inference_mesh(trained, loaded):
  _, _, params = trained
  model, cfg = loaded
  jax.tree.map(np.testing.assert_array_equal, params_of(model), params)
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 1, 1)  # data parallel over the local devices
  q = model.blocks.attn.q.kernel[...]
  assert q.sharding.mesh.shape["data"] == 8 and q.addressable_shards[0].data.shape == q.shape


def test_python_api_names():
  import paxlite
  from paxlite import evaluation, export, runs, sample

  assert paxlite.load is runs.load_run and paxlite.load_run is runs.load_run
  assert paxlite.generate is sample.generate and paxlite.evaluate is evaluation.evaluate
  assert paxlite.export_hf is export.export_hf and paxlite.import_hf is export.import_hf


def test_load_run_step_and_mesh_overrides(trained):
  run_dir, _, params = trained
  model, cfg = load_run(run_dir, step=2, overrides=["mesh.tensor=2", "precision.compute=float32"])
  q = model.blocks.attn.q.kernel[...]
  assert q.addressable_shards[0].data.shape == (2, 64, 2, 16)  # heads split over tensor
  earlier = params_of(model)
  assert not np.array_equal(earlier["head"]["kernel"], params["head"]["kernel"])
  with pytest.raises(ConfigError, match=r"--step: run directory '.*' has no checkpoint 3 \(it has \[2, 4\]\)"):
    load_run(run_dir, step=3)


def test_load_run_errors(tmp_path):
  with pytest.raises(ConfigError, match="run directory '.*/missing' not found"):
    load_run(str(tmp_path / "missing"))
  with pytest.raises(ConfigError, match="holds no config.yaml"):
    load_run(str(tmp_path))
  (tmp_path / "config.yaml").write_text("model:\n  d_model: 64\n")
  with pytest.raises(ConfigError, match="holds no checkpoints/"):
    load_run(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # nothing written


def test_eval_equals_the_trainers_eval_loss(trained, loaded):
  _, history, _ = trained
  model, cfg = loaded
  result = evaluate(model, cfg, batches=cfg.eval.batches, progress=False)
  assert result["sequences"] == 3 * 8 and result["tokens"] == 3 * 8 * 32
  np.testing.assert_allclose(result["loss"], history[-1]["eval_loss"], rtol=1e-5)
  assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))


def test_eval_of_a_file_scores_every_window_once(loaded, tmp_path):
  model, cfg = loaded
  path = tmp_path / "held_out.txt"
  path.write_text("def f(x):\n    return x + 1\n" * 40)  # 1080 bytes: 33 windows of 33 tokens
  result = evaluate(model, cfg, data=str(path), batch_size=5, progress=False)  # 7 batches, the last padded
  assert result["sequences"] == (1080 - 1) // 32 and result["tokens"] == result["sequences"] * 32
  # The same windows in one batch of their own give the same loss: padding rows do not count.
  whole = evaluate(model, cfg, data=str(path), batch_size=40, progress=False)
  np.testing.assert_allclose(result["loss"], whole["loss"], rtol=1e-5)
  assert 0 < result["loss"] < np.log(256) + 1


def test_eval_of_synthetic_tokens(loaded):
  model, cfg = loaded
  synthetic = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="synthetic"))
  result = evaluate(model, synthetic, batches=2, progress=False)
  assert result["sequences"] == 16 and result["source"] == "synthetic"
  assert result["loss"] > np.log(256) - 0.1  # uniform random bytes: nothing to predict


def test_cli_sample_greedy_is_generate(trained, loaded, capsys):
  run_dir, _, _ = trained
  model, cfg = loaded
  assert cli.main(["sample", run_dir, "--prompt", "import os", "--temperature", "0", "--max-new-tokens", "12"]) == 0
  out = capsys.readouterr().out
  expected = generate(model, [ByteTokenizer().encode("import os")], max_new_tokens=12, rules=cfg.rules)[0]
  assert out == "import os" + ByteTokenizer().decode(expected) + "\n"


def test_cli_sample_several_prompts_and_samples(trained, capsys):
  run_dir, _, _ = trained
  args = ["sample", run_dir, "--prompt", "a", "--prompt", "b", "--num-samples", "2", "--max-new-tokens", "5", "--seed", "1"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert [line for line in out.splitlines() if line.startswith("==> sample")] == [f"==> sample {i} <==" for i in range(1, 5)]


def test_cli_eval_prints_json(trained, capsys):
  run_dir, history, _ = trained
  assert cli.main(["eval", run_dir, "--batches", "3"]) == 0
  result = json.loads(capsys.readouterr().out)
  np.testing.assert_allclose(result["loss"], history[-1]["eval_loss"], rtol=1e-5)
  assert result["source"] == "val split of stdlib"


def test_cli_export_then_import_hf(trained, tmp_path, capsys):
  run_dir, _, params = trained
  hf_dir, new_run = tmp_path / "hf", tmp_path / "imported"
  assert cli.main(["export", run_dir, str(hf_dir), "--format", "hf"]) == 0
  assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
  assert cli.main(["import-hf", str(hf_dir), "--config", os.path.join(run_dir, "config.yaml"),
                   f"run.dir={new_run}", "checkpoint.async_save=false"]) == 0
  assert f"train with: paxlite train {new_run}/config.yaml" in capsys.readouterr().err
  model, _ = load_run(str(new_run))
  jax.tree.map(np.testing.assert_array_equal, params_of(model), params)


@pytest.mark.parametrize("args,message", [
    (["sample", "{run}", "--prompt", "x", "--step", "7"], "--step: run directory '{run}' has no checkpoint 7"),
    (["sample", "{run}", "--prompt", "x", "--max-new-tokens", "40"], "max_new_tokens: a prompt of 1 tokens plus 40"),
    (["sample", "{run}", "--prompt", "", "--max-new-tokens", "4"], "--prompt: prompt 1 is empty"),
    (["sample", "{run}", "--prompt", "x" * 32], "--prompt: a prompt of 32 tokens leaves no room under model.max_seq_len=32"),
    (["sample", "{run}", "--prompt", "x", "model.d_model=32"], "does not match the config: parameter 'blocks.attn.k.kernel'"),
    (["sample", "{run}", "--prompt", "x", "mesh.data=3"], "mesh: data=3"),
    (["eval", "{run}", "--data", "/no/such/file.txt"], "data.source: file '/no/such/file.txt' not found"),
    (["eval", "{run}", "--batches", "0"], "--batches: expected a positive integer, got 0"),
    (["export", "{run}", "{run}"], "OUT_DIR: '{run}' already exists and is not an empty directory"),
    (["import-hf", "{run}", "run.dir=/tmp/x"], "HF_DIR: '{run}' holds no config.json"),
    (["sample", "/no/run", "--prompt", "x"], "run directory '/no/run' not found"),
])
def test_cli_errors_are_one_line_and_write_nothing(trained, capsys, args, message):
  run_dir, _, _ = trained
  before = sorted(os.listdir(run_dir))
  assert cli.main([a.format(run=run_dir) for a in args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("paxlite: error: ") and message.format(run=run_dir) in err[0], err
  assert sorted(os.listdir(run_dir)) == before


def test_cli_error_in_a_fresh_process_is_one_line(trained, repo_root):
  # In-process tests cannot see what prints at interpreter exit (e.g. from background threads).
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "paxlite", "sample", trained[0], "--prompt", "x", "model.d_model=32"],
                        capture_output=True, text=True, cwd=repo_root, env=env)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"paxlite: error: run directory '{trained[0]}': checkpoint 4 does not match the config: parameter "
      "'blocks.attn.k.kernel' is (2, 64, 2, 16) there, (2, 32, 2, 8) with this config (were model.* keys overridden?)"]
