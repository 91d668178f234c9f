"""Bad input, through the real CLI: one line naming the key or file and what was expected, exit
code 2, no traceback, and nothing written into an existing run directory. Plus a fuzz test:
the override parser and config validation never fail with anything but ConfigError."""

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paxlite import cli
from paxlite.config import ConfigError, apply_overrides, config_from_dict, describe_keys, load_config, validate

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
SMALL = ["model.d_model=64", "model.d_ff=128", "model.seq_len=32", "train.batch_size=8", "train.steps=2",
         "data.max_files=30", "eval.every=0", "run.tensorboard=false"]

FILES = {
    "empty.txt": b"",
    "short.txt": b"hi\n",
    "binary.txt": b"\xff\xfe\x00bad",
    "nofield.jsonl": b'{"text": "abc"}\n{"body": "x"}\n',
    "tokenizer.json": b'{"not": "a tokenizer"}',
    "tagged.yaml": b"model: !!python/object/apply:os.system ['echo pwned']\n",
    "list.yaml": b"- 1\n- 2\n",
    "broken.yaml": b"model: [unclosed\n",
    "duplicate.yaml": b"train:\n  steps: 3\n  steps: 4\n",
    "a_file": b"x",
}

# (config file, overrides, what the one line must say). {d} is a folder holding FILES.
CASES = [
    (TINY, ["train.stpes=3"], "unknown config key 'train.stpes' (known: b1, b2"),
    (TINY, ["trian.steps=3"], "unknown config key 'trian' (known: checkpoint, data"),
    (TINY, ["train.steps=many"], "train.steps: expected int, got 'many'"),
    (TINY, ["train.batch_size=8.5"], "train.batch_size: expected int, got 8.5"),
    (TINY, ["model.num_layers=true"], "model.num_layers: expected int, got True"),
    (TINY, ["model.d_model=-64"], "model.d_model: expected a positive number, got -64"),
    (TINY, ["train.steps=0"], "train.steps: expected a positive number, got 0"),
    (TINY, ["train.lr=.nan"], "train.lr: expected a finite number, got nan"),
    (TINY, ["checkpoint.keep=0"], "checkpoint.keep: expected a positive number, got 0"),
    (TINY, ["train.nan_limit=-1"], "train.nan_limit: expected a non-negative number, got -1"),
    (TINY, ["train.on_nan=sometimes"], "train.on_nan: expected one of skip | rollback | stop, got 'sometimes'"),
    (TINY, ["precision.compute=float8"], "precision.compute: expected one of float32 | bfloat16 | float16"),
    (TINY, ["mesh.data=3"], "mesh: data=3 x fsdp=1 x stage=1 x tensor=1 makes 3 devices, but there are 8 devices"),
    (TINY, ["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one of mesh.data|fsdp|stage|tensor may be -1"),
    (TINY, ["mesh.data=2", "mesh.tensor=4"],
     "parameter 'blocks.attn.k.kernel' (2, 64, 2, 16): dimension 2 ('kv_heads', size 2) is not divisible by mesh axes tensor of size 4"),
    (TINY, ["mesh.data=4", "mesh.tensor=2", "model.vocab_size=257"],
     "parameter 'embed.embedding' (257, 64): dimension 0 ('vocab', size 257) is not divisible by mesh axes tensor"),
    (TINY, ["model.vocab_size=128"], "model.vocab_size: 128 is smaller than the tokenizer's vocabulary (256 tokens"),
    (TINY, ["model.seq_len=256", "model.max_seq_len=128"], "model.seq_len: 256 exceeds model.max_seq_len=128"),
    (TINY, ["train.grad_accum=3"], "train.grad_accum: 3 must divide train.batch_size=8"),
    (TINY, ["train.batch_size=12"], "train.batch_size: 12 sequences over 1 micro-batches"),
    (TINY, ["rules=[[batch, gpu]]"], "rules[0] (batch): unknown mesh axis 'gpu'"),
    (TINY, ["train.steps"], "override 'train.steps': expected key=value"),
    (TINY, ["train={steps: 3}"], "override 'train': expected a scalar or a list, got a mapping"),
    (TINY, ["data.source={d}/missing.txt"], "data.source: file '{d}/missing.txt' not found"),
    (TINY, ["data.source={d}/empty.txt"], "data.source: corpus '{d}/empty.txt' holds no text (0 tokens)"),
    (TINY, ["data.source={d}/short.txt"], "data.source: the train split holds 3 tokens, fewer than one sequence"),
    (TINY, ["data.source={d}/binary.txt"], "data.source: file '{d}/binary.txt' is not UTF-8 text"),
    (TINY, ["data.source={d}/nofield.jsonl"], "data.text_field: '{d}/nofield.jsonl' line 2 has no string field 'text'"),
    (TINY, ["data.tokenizer={d}/tokenizer.json"], "data.tokenizer: '{d}/tokenizer.json' is not a readable tokenizers"),
    (TINY, ["data.tokenizer={d}/missing.json"], "data.tokenizer: '{d}/missing.json' not found"),
    (TINY, ["data.cache_dir={d}/a_file/cache"], "data.cache_dir: cannot create '{d}/a_file/cache'"),
    ("{d}/tagged.yaml", [], "config file '{d}/tagged.yaml' is not valid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("{d}/duplicate.yaml", [], "config file '{d}/duplicate.yaml' is not valid YAML: while constructing a mapping"),
    ("{d}/list.yaml", [], "config file '{d}/list.yaml': expected a mapping of sections, got list"),
    ("{d}/broken.yaml", [], "config file '{d}/broken.yaml' is not valid YAML"),
    ("{d}/missing.yaml", [], "config file '{d}/missing.yaml' not found"),
    ("{d}", [], "config file '{d}' is a directory, expected a YAML file"),
    # The run directory holds a run of the tiny config: resuming it with another one is refused.
    (TINY, ["model.d_model=128"], "run.dir: checkpoint '{run}/checkpoints/2' holds 'params/blocks/attn/k/kernel' with shape (2, 64, 2, 16), this config gives (2, 128, 2, 32)"),
    (TINY, ["model.tie_embeddings=true"], "run.dir: checkpoint '{run}/checkpoints/2' holds an array 'params/head/kernel' this config does not have"),
    (TINY, ["train.batch_size=16"], "train.batch_size: the data loader state was saved with global_batch_size=8, now 16"),
    (TINY, ["run.seed=1"], "run.seed: the data loader state was saved with seed=0, now 1"),
]


def snapshot(root):
  """Every path under `root` with its size, modification time and content."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      st = os.lstat(path)
      content = open(path, "rb").read() if os.path.isfile(path) else None
      out[path] = (st.st_size, st.st_mtime_ns, content)
  return out


def filler(folder, run_dir):
  return lambda text: text.replace("{d}", folder).replace("{run}", run_dir)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_cache):
  """A folder of bad files, and a run directory holding a finished 2-step run of SMALL."""
  folder = tmp_path_factory.mktemp("inputs")
  for name, content in FILES.items():
    (folder / name).write_bytes(content)
  run_dir = tmp_path_factory.mktemp("existing-run")
  assert cli.main(["train", TINY, *SMALL, f"run.dir={run_dir}"]) == 0
  assert os.path.isdir(run_dir / "checkpoints" / "2")
  return str(folder), str(run_dir)


@pytest.mark.parametrize("config,overrides,message", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, capsys, config, overrides, message):
  fill = filler(*inputs)
  run_dir = inputs[1]
  before = snapshot(run_dir)
  capsys.readouterr()
  code = cli.main(["train", fill(config), *SMALL, f"run.dir={run_dir}", *map(fill, overrides)])
  err = capsys.readouterr().err
  assert code == 2
  assert err.count("\n") == 1 and err.startswith("paxlite: error: "), err
  assert fill(message) in err
  assert snapshot(run_dir) == before


def test_an_unwritable_run_directory_is_bad_input(inputs, capsys):
  folder, _ = inputs
  code = cli.main(["train", TINY, *SMALL, f"run.dir={folder}/a_file/run"])
  assert code == 2
  assert capsys.readouterr().err == f"paxlite: error: run.dir: cannot write into '{folder}/a_file/run' (Not a directory)\n"


def test_table_covers_at_least_25_faults():
  assert len(CASES) >= 25


IN_A_SUBPROCESS = [CASES[i] for i, (_, _, message) in enumerate(CASES) if message.startswith((
    "mesh: data=3", "data.source: file '{d}/missing.txt'", "config file '{d}/tagged.yaml'",
    "run.dir: checkpoint '{run}/checkpoints/2' holds 'params"))]


@pytest.mark.parametrize("config,overrides,message", IN_A_SUBPROCESS, ids=[c[2].split(":")[0] for c in IN_A_SUBPROCESS])
def test_no_traceback_from_a_real_process(inputs, repo_root, config, overrides, message):
  fill = filler(*inputs)
  run_dir = inputs[1]
  before = snapshot(run_dir)
  proc = subprocess.run([sys.executable, "-m", "paxlite", "train", fill(config), *SMALL, f"run.dir={run_dir}",
                         *map(fill, overrides)], capture_output=True, text=True, cwd=repo_root)
  assert proc.returncode == 2
  assert proc.stderr.startswith("paxlite: error: ") and proc.stderr.count("\n") == 1, proc.stderr
  assert fill(message) in proc.stderr
  assert snapshot(run_dir) == before


def test_the_subprocess_selection_is_not_empty():
  assert len(IN_A_SUBPROCESS) == 4


# ---------------------------------------------------------------------------------------
# Fuzz: whatever the overrides, only ConfigError (one line) ever escapes.
# ---------------------------------------------------------------------------------------

KEYS = [key for key, _, _ in describe_keys()]
SECTIONS = sorted({key.split(".")[0] for key in KEYS})
VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1", "3", "8", "1e-3", "1e400", ".nan", ".inf", "-.inf", "null", "~", "true", "[]",
                     "[[batch, data]]", "[[batch, [data, data]]]", "[1, 2]", "{a: 1}", "'x'", "!!python/name:os.system",
                     "&a [*a]", "[", "'", "9" * 5000, "float32", "skip", "-", "0x10", "1_000"]),
    st.integers().map(str), st.floats().map(repr), st.text(max_size=30),
)
OVERRIDES = st.lists(st.builds("{}={}".format, st.one_of(st.sampled_from(KEYS + SECTIONS), st.text(max_size=20)),
                               VALUES) | st.text(max_size=40), max_size=6)


def check(run):
  try:
    run()
  except ConfigError as e:
    assert "\n" not in str(e) and str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OVERRIDES)
def test_fuzz_overrides_only_ever_raise_config_error(overrides):
  check(lambda: load_config(None, overrides))


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10))
TREES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS + [k.split(".")[1] for k in KEYS if "." in k]), st.text(max_size=5)),
    inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=5), TREES, max_size=4),
       st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=4))
def test_fuzz_config_trees_only_ever_raise_config_error(tree, overrides):
  check(lambda: validate(config_from_dict(apply_overrides(tree, overrides))))
