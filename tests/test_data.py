"""Tests for paxlite.data: tokenizers, cached corpora, deterministic and resumable loaders."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from paxlite import data
from paxlite.config import ConfigError, DataConfig


def cfg_for(tmp_path, source, **kw):
  return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def loader(cfg, **kw):
  args = dict(seq_len=8, global_batch_size=4, seed=0, vocab_size=256)
  args.update(kw)
  return data.make_train_loader(cfg, **args)


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
  return path


@pytest.fixture
def hf_tokenizer_file(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  words = ["<unk>", "</s>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()  # joins tokens with spaces
  path = tmp_path / "tok" / "tokenizer.json"
  path.parent.mkdir()
  tok.save(str(path))
  return path


def test_module_does_not_import_jax():
  code = "import sys, paxlite.data; assert 'jax' not in sys.modules and 'grain' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_byte_tokenizer_round_trip():
  tok = data.load_tokenizer("byte")
  text = "héllo wörld — 日本語 🙂\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < tok.vocab_size == 256
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.eos_id is None and tok.name == "byte"


def test_hf_tokenizer_and_corpus(tmp_path, hf_tokenizer_file):
  tok = data.load_tokenizer(str(hf_tokenizer_file.parent))  # a directory holding tokenizer.json
  assert tok.vocab_size == 10 and tok.eos_id == 1 and tok.path == str(hf_tokenizer_file)
  ids = tok.encode("the quick cat")
  assert ids.tolist() == [2, 3, 0]
  assert tok.decode(ids) == "the quick <unk>"
  src = tmp_path / "d.jsonl"
  src.write_text('{"text": "the fox"}\n{"text": "lazy dog"}\n')
  corpus = data.load_corpus(cfg_for(tmp_path, src, tokenizer=str(hf_tokenizer_file), val_fraction=0.2))
  # Documents are separated by the eos token.
  assert np.concatenate([corpus.train, corpus.val]).tolist() == [2, 5, 1, 8, 9]
  assert corpus.train.dtype == np.uint16


def test_text_file_corpus_and_split(tmp_path, text_file):
  corpus = data.load_corpus(cfg_for(tmp_path, text_file, val_fraction=0.1))
  raw = text_file.read_bytes()
  assert corpus.num_tokens == len(raw)
  assert corpus.val.shape[0] == int(len(raw) * 0.1)
  assert np.concatenate([corpus.train, corpus.val]).astype(np.uint8).tobytes() == raw  # val is the contiguous tail
  assert isinstance(corpus.train.base, np.memmap) or isinstance(corpus.train, np.memmap)


def test_jsonl_corpus_and_bad_line(tmp_path):
  good = tmp_path / "good.jsonl"
  good.write_text('{"text": "alpha"}\n\n{"body": 1, "text": "beta"}\n')
  corpus = data.load_corpus(cfg_for(tmp_path, good))
  assert corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val])) == "alpha\n\nbeta"
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{not json\n')
  with pytest.raises(ConfigError, match=r"data.source: .*bad.jsonl' line 2 is not valid JSON"):
    data.load_corpus(cfg_for(tmp_path, bad))
  assert not list((tmp_path / "cache").glob("bad*"))  # a failed build leaves no cache behind
  missing = tmp_path / "missing_field.jsonl"
  missing.write_text('{"text": "ok"}\n{"content": "x"}\n')
  with pytest.raises(ConfigError, match=r"data.text_field: .*missing_field.jsonl' line 2 .*'text'"):
    data.load_corpus(cfg_for(tmp_path, missing))


def test_directory_corpus_sorted_and_max_files(tmp_path):
  root = tmp_path / "docs"
  (root / "sub").mkdir(parents=True)
  (root / "b.txt").write_text("B")
  (root / "a.md").write_text("A")
  (root / "sub" / "c.py").write_text("C")
  (root / "d.jsonl").write_text('{"text": "D"}\n')
  (root / "ignored.bin").write_text("X")
  stream = lambda c: c.tokenizer.decode(np.concatenate([c.train, c.val]))
  assert stream(data.load_corpus(cfg_for(tmp_path, root))) == "A\n\nB\n\nD\n\nC"
  assert stream(data.load_corpus(cfg_for(tmp_path, root, max_files=2))) == "A\n\nB"


def test_cache_reused_not_retokenized(tmp_path, text_file, monkeypatch):
  cfg = cfg_for(tmp_path, text_file)
  first = data.load_corpus(cfg)
  mtime = os.stat(first.cache_path).st_mtime_ns
  assert [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")] == []
  data._MEMO.clear()  # force the on-disk path

  def fail(*a, **k):
    raise AssertionError("re-tokenized")

  monkeypatch.setattr(data.ByteTokenizer, "encode_batch", fail)
  second = data.load_corpus(cfg)
  assert second.cache_path == first.cache_path and os.stat(second.cache_path).st_mtime_ns == mtime
  np.testing.assert_array_equal(second.train, first.train)
  # A changed source is a new cache key.
  monkeypatch.undo()
  text_file.write_text("something else entirely\n" * 10)
  assert data.load_corpus(cfg).cache_path != first.cache_path


def test_progress_bar_only_on_a_tty(tmp_path, monkeypatch):
  import io

  class Tty(io.StringIO):
    def isatty(self):
      return True

  root = tmp_path / "many"
  root.mkdir()
  for i in range(120):  # "many files": the bar shows from 100 files on
    (root / f"{i:03d}.txt").write_text(f"document {i}\n")
  monkeypatch.setattr(sys, "stderr", Tty())
  data.load_corpus(cfg_for(tmp_path, root, max_files=5))
  assert sys.stderr.getvalue() == ""  # few files: silent
  data.load_corpus(cfg_for(tmp_path, root))
  assert "tokenizing many" in sys.stderr.getvalue()


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv("PAXLITE_CACHE", str(tmp_path / "envcache"))
  assert data.cache_dir(DataConfig()) == str(tmp_path / "envcache")
  assert os.path.isdir(tmp_path / "envcache")


def test_stdlib_corpus(tmp_path):
  corpus = data.load_corpus(cfg_for(tmp_path, "stdlib", max_files=20))
  assert corpus.num_tokens > 10_000
  text = corpus.tokenizer.decode(corpus.train[:5000])
  assert "import" in text or "def " in text


def test_windows_and_deterministic_order(tmp_path, text_file):
  cfg = cfg_for(tmp_path, text_file)
  corpus = data.load_corpus(cfg)
  windows = data.TokenWindows(corpus.train, 8)
  assert windows[1][0] == windows[0][-1] and windows[0].shape == (9,)
  take = lambda ld, n: [next(ld) for _ in range(n)]
  a, b = take(loader(cfg, seed=1), 5), take(loader(cfg, seed=1), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert a[0].shape == (4, 9) and a[0].dtype == np.int32
  c = next(loader(cfg, seed=2))
  assert not np.array_equal(a[0], c)
  # Every row is one of the windows.
  starts = {tuple(windows[i]) for i in range(len(windows))}
  assert all(tuple(row) in starts for row in a[0])


def test_epochs_cover_all_windows_and_reshuffle(tmp_path):
  src = tmp_path / "small.txt"
  src.write_bytes(bytes(range(97, 123)) * 4)  # 104 tokens
  cfg = cfg_for(tmp_path, src, val_fraction=0.01)
  ld = loader(cfg, seq_len=8, global_batch_size=4)
  n = ld.num_examples
  assert n == 12
  rows = np.concatenate([next(ld) for _ in range(2 * n // 4)])
  windows = data.TokenWindows(data.load_corpus(cfg).train, 8)
  ids = [next(i for i in range(n) if np.array_equal(windows[i], r)) for r in rows]
  assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
  assert ids[:n] != ids[n:]  # reshuffled per epoch


@pytest.mark.parametrize("source", ["file", "synthetic"])
def test_process_slices_union_is_global_batch(tmp_path, text_file, source):
  cfg = cfg_for(tmp_path, text_file if source == "file" else "synthetic")
  whole = loader(cfg, global_batch_size=6)
  parts = [loader(cfg, global_batch_size=6, process_index=p, process_count=2) for p in range(2)]
  for _ in range(4):
    local = [next(p) for p in parts]
    assert local[0].shape == (3, 9)
    np.testing.assert_array_equal(np.concatenate(local), next(whole))


@pytest.mark.parametrize("source", ["file", "synthetic"])
def test_resume_exact(tmp_path, text_file, source):
  cfg = cfg_for(tmp_path, text_file if source == "file" else "synthetic")
  ld = loader(cfg)
  for _ in range(3):
    next(ld)
  state = json.loads(json.dumps(ld.get_state()))  # as stored in a checkpoint
  assert ld.step == 3 and state["step"] == 3
  expected = [next(ld) for _ in range(2)]
  resumed = loader(cfg)
  resumed.set_state(state)
  assert resumed.step == 3
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)
  other = loader(cfg, global_batch_size=8)
  with pytest.raises(ConfigError, match="train.batch_size"):
    other.set_state(state)


def test_synthetic_tokens(tmp_path):
  cfg = cfg_for(tmp_path, "synthetic")
  batch = next(loader(cfg, vocab_size=50, seq_len=16))
  assert batch.shape == (4, 17) and batch.dtype == np.int32
  assert batch.min() >= 0 and batch.max() < 50
  assert not (tmp_path / "cache").exists()  # no corpus read or written
  evals = data.make_eval_batches(cfg, seq_len=16, batch_size=4, num_batches=2, vocab_size=50)
  assert not np.array_equal(evals[0], batch)


def test_eval_batches(tmp_path, text_file):
  cfg = cfg_for(tmp_path, text_file, val_fraction=0.05)
  kw = dict(seq_len=8, batch_size=4, num_batches=3, vocab_size=256)
  first = data.make_eval_batches(cfg, **kw)
  again = data.make_eval_batches(cfg, **kw)
  assert len(first) == 3 and first[0].shape == (4, 9)
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x, y)
  val = data.load_corpus(cfg).val
  np.testing.assert_array_equal(first[0][1], val[8:17])  # in order, no shuffle
  halves = [data.make_eval_batches(cfg, **kw, process_index=p, process_count=2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([halves[0][2], halves[1][2]]), first[2])
  # A short split wraps around instead of failing.
  many = data.make_eval_batches(cfg, **{**kw, "num_batches": 200})
  assert len(many) == 200


def test_error_missing_file(tmp_path):
  with pytest.raises(ConfigError, match=r"data.source: file '.*nope.txt' not found"):
    data.load_corpus(cfg_for(tmp_path, tmp_path / "nope.txt"))


def test_error_empty_corpus(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ConfigError, match=r"data.source: corpus '.*empty.txt' holds no text \(0 tokens\)"):
    data.load_corpus(cfg_for(tmp_path, empty))
  assert os.listdir(tmp_path / "cache") == []  # nothing half-written left behind
  (tmp_path / "nodocs").mkdir()
  with pytest.raises(ConfigError, match=r"data.source: directory '.*nodocs' holds no"):
    data.load_corpus(cfg_for(tmp_path, tmp_path / "nodocs"))


def test_error_not_utf8(tmp_path):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("caf\u00e9".encode("latin-1"))
  with pytest.raises(ConfigError, match=r"data.source: file '.*latin1.txt' is not UTF-8"):
    data.load_corpus(cfg_for(tmp_path, bad))


def test_error_tokenizer_paths(tmp_path, text_file):
  with pytest.raises(ConfigError, match=r"data.tokenizer: '.*missing.json' not found"):
    data.load_corpus(cfg_for(tmp_path, text_file, tokenizer=str(tmp_path / "missing.json")))
  with pytest.raises(ConfigError, match=r"data.tokenizer: directory '.*' holds no tokenizer.json"):
    data.load_tokenizer(str(tmp_path))
  garbage = tmp_path / "tokenizer.json"
  garbage.write_text("{this is not a tokenizer")
  pytest.importorskip("tokenizers")
  with pytest.raises(ConfigError, match=r"data.tokenizer: '.*tokenizer.json' is not a readable tokenizers"):
    data.load_tokenizer(str(garbage))


def test_error_vocab_too_small(tmp_path, text_file):
  with pytest.raises(ConfigError, match=r"model.vocab_size: 100 .*256"):
    loader(cfg_for(tmp_path, text_file), vocab_size=100)


def test_error_batch_not_divisible(tmp_path, text_file):
  with pytest.raises(ConfigError, match=r"train.batch_size: 5 .* 2 processes"):
    loader(cfg_for(tmp_path, text_file), global_batch_size=5, process_count=2, process_index=1)


def test_error_splits_too_small(tmp_path):
  tiny = tmp_path / "tiny.txt"
  tiny.write_text("x" * 20)
  cfg = cfg_for(tmp_path, tiny, val_fraction=0.1)
  with pytest.raises(ConfigError, match=r"data.source: the train split holds 18 tokens"):
    loader(cfg, seq_len=32)
  with pytest.raises(ConfigError, match=r"data.val_fraction: the validation split holds 2 of 20 tokens"):
    data.make_eval_batches(cfg, seq_len=8, batch_size=2, num_batches=1, vocab_size=256)
