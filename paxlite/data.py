"""Tokenizers, tokenized corpora cached on disk, and the deterministic, checkpointable loaders.

Data flows one way: `DataConfig` -> a tokenizer and a list of source files -> one flat token
stream, tokenized once and cached as a memory-mapped `.npy` -> the contiguous tail of the
stream is validation, the rest training -> training examples are non-overlapping windows of
`seq_len + 1` tokens, read in a seeded shuffled order by a Grain `MapDataset`.

Design choices:
  * Everything is in-process (no worker processes): an example is a slice of a memmap, so
    reading is cheap, and an in-process iterator is exactly restorable from a tiny JSON state.
  * The batch order is defined globally (seed -> permutation of windows -> global batches);
    process p of P reads only rows [p*B/P, (p+1)*B/P) of each global batch, so the union of
    what P processes read is exactly what one process would read, and a checkpointed `step`
    means the same thing for any process count.
  * This module never imports jax (grain does, so grain is imported only when a loader is
    built), and never pickles: the cache is a plain `.npy`, loader state is JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from paxlite.config import ConfigError, DataConfig

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "TokenCorpus",
    "load_corpus",
    "TokenWindows",
    "TrainLoader",
    "make_train_loader",
    "make_eval_batches",
    "cache_dir",
]

# Bumped whenever the tokenized stream for the same inputs would change (separators, file
# selection, special-token handling), so stale caches are never reused.
_CACHE_FORMAT = 1
_TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
# Stdlib directories left out of the embedded corpus: site-packages is not the standard
# library (it depends on what is installed), and the test suites are often stripped by Linux
# distributions, so leaving them out keeps the corpus the same across installs of one version.
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
_BLOCK_BYTES = 4 << 20  # text is read and tokenized in ~4 MiB pieces: bounded memory
_SYNTHETIC_TRAIN, _SYNTHETIC_EVAL = 0, 1  # stream tags: eval batches never equal train ones


def _first_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


class ByteTokenizer:
  """UTF-8 bytes as tokens: 256 ids, no special tokens, nothing to download."""

  name = "byte"
  vocab_size = 256
  eos_id: int | None = None

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Any) -> str:
    return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
  """A local `tokenizers` tokenizer.json (BPE, WordPiece, ...), with the ByteTokenizer interface.

  Encoding adds no special tokens (no BOS, no post-processor template): the corpus builder
  inserts document separators itself. `eos_id` is the first of the usual end-of-text tokens
  the vocabulary holds, or None.
  """

  name = "hf"

  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError:
      raise ConfigError(
          f"data.tokenizer: '{path}' needs the `tokenizers` package (pip install tokenizers)"
      ) from None
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise ConfigError(
          f"data.tokenizer: '{path}' is not a readable tokenizers tokenizer.json ({_first_line(e)})"
      ) from None
    self.path = path
    self.vocab_size = int(self._tok.get_vocab_size())
    self.eos_id = next(
        (i for i in map(self._tok.token_to_id, _EOS_CANDIDATES) if i is not None), None
    )

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]

  def decode(self, ids: Any) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


Tokenizer = ByteTokenizer | HFTokenizer


def _tokenizer_file(spec: str) -> str:
  """Resolves data.tokenizer to a tokenizer.json path; a directory holding one also works."""
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isdir(path):
    inner = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(inner):
      raise ConfigError(f"data.tokenizer: directory '{path}' holds no tokenizer.json")
    return inner
  if not os.path.exists(path):
    raise ConfigError(f"data.tokenizer: '{path}' not found, expected byte or a path to a tokenizer.json")
  return path


def load_tokenizer(spec: str) -> Tokenizer:
  """"byte" -> ByteTokenizer; otherwise a path to a tokenizer.json (or a directory with one)."""
  if spec == "byte":
    return ByteTokenizer()
  return HFTokenizer(_tokenizer_file(spec))


def _tokenizer_identity(spec: str) -> str:
  """What the cache key needs: the tokenizer's content, not where it lives."""
  if spec == "byte":
    return "byte"
  path = _tokenizer_file(spec)
  try:
    with open(path, "rb") as f:
      return "sha256:" + hashlib.sha256(f.read()).hexdigest()
  except OSError as e:
    raise ConfigError(f"data.tokenizer: '{path}' cannot be read ({_first_line(e)})") from None


# ---------------------------------------------------------------------------------------
# Sources: which files, in which order
# ---------------------------------------------------------------------------------------


def _walk(root: str, suffixes: tuple[str, ...], skip: set[str]) -> list[str]:
  """Files under `root` with one of `suffixes`, in sorted path order (deterministic)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Hidden directories (.git, .venv, ...) are never corpus text.
    dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
    found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(suffixes))
  return sorted(found)


def _source_files(cfg: DataConfig) -> tuple[str, list[str], bool]:
  """Returns (label, files, strict_utf8) for data.source; user files must be valid UTF-8."""
  if cfg.source == "stdlib":
    root = sysconfig.get_paths()["stdlib"]
    files = _walk(root, (".py",), _STDLIB_SKIP)
    if not files:
      raise ConfigError(f"data.source: stdlib: no .py files under '{root}' (stripped Python install?)")
    return "stdlib", files[: cfg.max_files], False
  path = os.path.abspath(os.path.expanduser(cfg.source))
  if os.path.isdir(path):
    files = _walk(path, _TEXT_SUFFIXES, set())
    if not files:
      raise ConfigError(f"data.source: directory '{path}' holds no {'/'.join(_TEXT_SUFFIXES)} files")
    files = files[: cfg.max_files]
  elif os.path.isfile(path):
    files = [path]
  else:
    raise ConfigError(
        f"data.source: file '{path}' not found (expected stdlib, synthetic, or a path to a text "
        f"file, a .jsonl file or a directory)"
    )
  label = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path.rstrip(os.sep)))[:40] or "corpus"
  return label, files, True


def _pieces(files: list[str], text_field: str, strict: bool) -> Iterator[tuple[str, bool, int]]:
  """Yields (text, starts_a_document, bytes_read): each text file is one document, read in
  line-aligned blocks; each JSONL record is one document."""
  errors = "strict" if strict else "replace"
  for path in files:
    try:
      f = open(path, "rb")
    except OSError as e:
      raise ConfigError(f"data.source: file '{path}' cannot be read ({_first_line(e)})") from None
    with f:
      if path.endswith(".jsonl"):
        for lineno, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except ValueError as e:
            raise ConfigError(
                f"data.source: '{path}' line {lineno} is not valid JSON ({_first_line(e)})"
            ) from None
          text = record.get(text_field) if isinstance(record, dict) else None
          if not isinstance(text, str):
            raise ConfigError(
                f"data.text_field: '{path}' line {lineno} has no string field {text_field!r}"
            )
          yield text, True, len(line)
      else:
        offset, first = 0, True
        while block := f.read(_BLOCK_BYTES):
          # Finish the current line, so no UTF-8 character (nor, usually, a word) is split.
          block += f.readline()
          try:
            text = block.decode("utf-8", errors=errors)
          except UnicodeDecodeError as e:
            raise ConfigError(
                f"data.source: file '{path}' is not UTF-8 text (byte {offset + e.start}: {e.reason})"
            ) from None
          yield text, first, len(block)
          offset, first = offset + len(block), False


# ---------------------------------------------------------------------------------------
# Tokenized corpus: tokenize once, cache as .npy, memory-map
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
  """A tokenized corpus: `train` and `val` are 1-D (memory-mapped) views of one token stream;
  `val` is its contiguous tail, a `data.val_fraction` share."""

  tokenizer: Tokenizer
  train: np.ndarray
  val: np.ndarray
  num_tokens: int
  cache_path: str


def cache_root() -> str:
  """$PAXLITE_CACHE, else ~/.cache/paxlite: where paxlite keeps what it derives and reuses
  (tokenized corpora here, compiled steps under jax/ by default)."""
  return os.path.abspath(os.path.expanduser(os.environ.get("PAXLITE_CACHE") or os.path.join("~", ".cache", "paxlite")))


def cache_dir(cfg: DataConfig) -> str:
  """data.cache_dir, else cache_root() (created if missing)."""
  path = os.path.abspath(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else cache_root()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"data.cache_dir: cannot create '{path}' ({_first_line(e)})") from None
  return path


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _tokenize_to_npy(cfg: DataConfig, files: list[str], strict: bool, tokenizer: Tokenizer,
                     dest: str, label: str, total_bytes: int) -> None:
  """Tokenizes `files` into the flat `.npy` at `dest`, atomically.

  Tokens stream to a raw temp file (memory stays bounded for large corpora), then the `.npy`
  is assembled in a second temp file and renamed into place: a killed run never leaves a
  half-written cache, and concurrent processes building the same cache both end up correct.
  """
  from tqdm import tqdm

  dtype = _token_dtype(tokenizer.vocab_size)
  sep = np.asarray([tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode("\n\n"), dtype)
  show = sys.stderr.isatty() and (len(files) >= 100 or total_bytes >= 64 << 20)
  folder = os.path.dirname(dest)
  temps = []
  try:
    fd, raw_path = tempfile.mkstemp(dir=folder, prefix=".tokens-", suffix=".tmp")
    temps.append(raw_path)
    count = 0
    with os.fdopen(fd, "wb") as raw, tqdm(total=total_bytes, unit="B", unit_scale=True,
                                         desc=f"tokenizing {label}", disable=not show) as bar:
      batch: list[tuple[str, bool, int]] = []

      def flush() -> None:
        nonlocal count
        parts = []
        for (_, starts, _), ids in zip(batch, tokenizer.encode_batch([t for t, _, _ in batch])):
          if starts and (count or parts):
            parts.append(sep)  # documents are separated, not terminated
          parts.append(ids.astype(dtype))
        if parts:
          out = np.concatenate(parts)
          raw.write(out.tobytes())
          count += out.size
        bar.update(sum(n for _, _, n in batch))
        batch.clear()

      pending = 0
      for piece in _pieces(files, cfg.text_field, strict):
        batch.append(piece)
        pending += piece[2]
        if pending >= _BLOCK_BYTES:
          flush()
          pending = 0
      flush()
    if count == 0:
      raise ConfigError(f"data.source: corpus '{cfg.source}' holds no text (0 tokens)")
    fd, npy_path = tempfile.mkstemp(dir=folder, prefix=".tokens-", suffix=".npy.tmp")
    temps.append(npy_path)
    with os.fdopen(fd, "wb") as out, open(raw_path, "rb") as raw:
      header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
      np.lib.format.write_array_header_1_0(out, header)
      shutil.copyfileobj(raw, out, 16 << 20)
      out.flush()
      os.fsync(out.fileno())
    os.chmod(npy_path, 0o644)  # mkstemp makes 0600; a shared cache should be readable
    os.replace(npy_path, dest)
  finally:
    for path in temps:
      if os.path.exists(path):
        os.unlink(path)


# In-process memo: cache path -> (tokenizer, memmapped tokens). The path embeds the content
# key, so a changed source or tokenizer gets a new entry instead of a stale one.
_MEMO: dict[str, tuple[Tokenizer, np.ndarray]] = {}


def load_corpus(cfg: DataConfig) -> TokenCorpus:
  """Tokenizes data.source with data.tokenizer (once; cached on disk and in-process) and
  splits off the last data.val_fraction of the stream as validation."""
  if cfg.source == "synthetic":
    raise ValueError("data.source=synthetic has no corpus; the loaders generate its tokens")
  label, files, strict = _source_files(cfg)
  stats = []
  for path in files:
    st = os.stat(path)
    stats.append([os.path.realpath(path), st.st_size, st.st_mtime_ns])
  key = json.dumps({
      "format": _CACHE_FORMAT,
      "files": stats,
      "tokenizer": _tokenizer_identity(cfg.tokenizer),
      "text_field": cfg.text_field,
      "max_files": cfg.max_files,
  })
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  tok_name = "byte" if cfg.tokenizer == "byte" else "hf"
  dest = os.path.join(cache_dir(cfg), f"{label}-{tok_name}-{digest}.npy")

  if dest not in _MEMO:
    tokenizer = load_tokenizer(cfg.tokenizer)
    tokens = None
    if os.path.exists(dest):
      try:
        tokens = np.load(dest, mmap_mode="r")
      except (OSError, ValueError):
        tokens = None  # unreadable cache (e.g. truncated by hand): rebuild it
    if tokens is None:
      _tokenize_to_npy(cfg, files, strict, tokenizer, dest, label, sum(s[1] for s in stats))
      tokens = np.load(dest, mmap_mode="r")
    _MEMO[dest] = (tokenizer, tokens)
  tokenizer, tokens = _MEMO[dest]
  n = int(tokens.shape[0])
  n_val = int(n * cfg.val_fraction)
  return TokenCorpus(tokenizer, tokens[: n - n_val], tokens[n - n_val :], n, dest)


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------


class TokenWindows:
  """Grain random-access source: example i = tokens[i*L : i*L + L + 1] as int32.

  Consecutive windows share one token, so every token (but the first) is a target exactly once.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self) -> int:
    return max(0, (self.tokens.shape[0] - 1) // self.seq_len)

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)


def _check_vocab(tokenizer: Tokenizer, vocab_size: int, cfg: DataConfig) -> None:
  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(
        f"model.vocab_size: {vocab_size} is smaller than the tokenizer's vocabulary "
        f"({tokenizer.vocab_size} tokens, data.tokenizer={cfg.tokenizer!r}); set it >= {tokenizer.vocab_size}"
    )


def _local_rows(batch_size: int, process_index: int, process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
  if batch_size % process_count:
    raise ConfigError(
        f"train.batch_size: {batch_size} does not divide evenly over {process_count} processes"
    )
  return batch_size // process_count


def _synthetic_batch(seed: int, tag: int, index: int, first_row: int, rows: int, seq_len: int,
                     vocab_size: int) -> np.ndarray:
  """Rows [first_row, first_row + rows) of synthetic global batch `index`. Each row has its own
  generator, seeded by (seed, stream, batch, row): the same row whatever the process count."""
  out = np.empty((rows, seq_len + 1), dtype=np.int32)
  for j in range(rows):
    rng = np.random.default_rng([seed % 2**32, tag, index, first_row + j])
    out[j] = rng.integers(0, vocab_size, size=seq_len + 1, dtype=np.int32)
  return out


class TrainLoader:
  """Yields this process's rows of each global batch: int32 [B/P, seq_len + 1], forever.

  `get_state()` is a JSON-serialisable dict; `set_state()` on a loader built with the same
  settings resumes exactly. `step` counts global batches yielded so far.
  """

  def __init__(self, cfg: DataConfig, *, seq_len: int, global_batch_size: int, seed: int,
               vocab_size: int, process_index: int = 0, process_count: int = 1):
    self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
    self.vocab_size, self.process_index = vocab_size, process_index
    self.batch_size = _local_rows(global_batch_size, process_index, process_count)
    self.step = 0
    self.synthetic = cfg.source == "synthetic"
    self.tokenizer: Tokenizer | None = None
    self.num_examples = 0
    self._iter = None
    if self.synthetic:
      return
    corpus = load_corpus(cfg)
    _check_vocab(corpus.tokenizer, vocab_size, cfg)
    self.tokenizer = corpus.tokenizer
    windows = TokenWindows(corpus.train, seq_len)
    self.num_examples = len(windows)
    if not self.num_examples:
      raise ConfigError(
          f"data.source: the train split holds {corpus.train.shape[0]} tokens, fewer than one "
          f"sequence of model.seq_len+1 = {seq_len + 1}; use a larger corpus or a shorter seq_len"
      )
    import grain  # imports jax: kept out of module import

    # shuffle then repeat: grain reseeds the permutation per epoch (seed + epoch).
    ds = grain.MapDataset.source(windows).shuffle(seed=seed % 2**32).repeat()
    # Global batch g is elements [g*B, (g+1)*B) of that stream; in batches of B/P it is the
    # P consecutive batches g*P .. g*P+P-1, of which this process takes the p-th.
    ds = ds.batch(self.batch_size)[process_index::process_count]
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # in-process, exact
    self._iter = iter(ds.to_iter_dataset(options))

  def __iter__(self) -> TrainLoader:
    return self

  def __next__(self) -> np.ndarray:
    if self.synthetic:
      batch = _synthetic_batch(self.seed, _SYNTHETIC_TRAIN, self.step, self.process_index * self.batch_size,
                               self.batch_size, self.seq_len, self.vocab_size)
    else:
      batch = np.asarray(next(self._iter), dtype=np.int32)
    self.step += 1
    return batch

  def _identity(self) -> dict[str, Any]:
    return {"synthetic": self.synthetic, "seed": self.seed, "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len, "num_examples": self.num_examples}

  def get_state(self) -> dict[str, Any]:
    state = {"step": self.step, **self._identity()}
    if self._iter is not None:
      state["grain"] = self._iter.get_state()
    return state

  def set_state(self, state: dict[str, Any]) -> None:
    # A different seed, batch size, seq_len or corpus gives a different batch order: resuming
    # would silently not be a resume, so say which setting changed.
    names = {"global_batch_size": "train.batch_size", "seed": "run.seed", "seq_len": "model.seq_len",
             "num_examples": "data.source", "synthetic": "data.source"}
    for key, value in self._identity().items():
      if state.get(key) != value:
        raise ConfigError(
            f"{names[key]}: the data loader state was saved with {key}={state.get(key)!r}, now "
            f"{value!r}; batches would not resume where they left off"
        )
    self.step = int(state["step"])
    if self._iter is not None:
      self._iter.set_state(state["grain"])


def make_train_loader(cfg: DataConfig, *, seq_len: int, global_batch_size: int, seed: int,
                      vocab_size: int, process_index: int = 0, process_count: int = 1) -> TrainLoader:
  """The training batch iterator for this process; see TrainLoader."""
  return TrainLoader(cfg, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                     vocab_size=vocab_size, process_index=process_index, process_count=process_count)


def make_eval_batches(cfg: DataConfig, *, seq_len: int, batch_size: int, num_batches: int,
                      vocab_size: int, process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """This process's rows of the fixed validation batches: the first num_batches*batch_size
  windows of the validation split, in order (wrapping around a short split); the same every
  call. `batch_size` is global; each returned array is int32 [batch_size/P, seq_len + 1]."""
  rows = _local_rows(batch_size, process_index, process_count)
  first = process_index * rows
  if cfg.source == "synthetic":
    return [_synthetic_batch(0, _SYNTHETIC_EVAL, b, first, rows, seq_len, vocab_size)
            for b in range(num_batches)]
  corpus = load_corpus(cfg)
  _check_vocab(corpus.tokenizer, vocab_size, cfg)
  windows = TokenWindows(corpus.val, seq_len)
  if not len(windows):
    raise ConfigError(
        f"data.val_fraction: the validation split holds {corpus.val.shape[0]} of {corpus.num_tokens} "
        f"tokens, fewer than one sequence of model.seq_len+1 = {seq_len + 1}; raise data.val_fraction "
        f"or use a larger corpus"
    )
  return [np.stack([windows[(b * batch_size + first + j) % len(windows)] for j in range(rows)])
          for b in range(num_batches)]
