"""Validation loss and perplexity of a model on a split of its run's corpus or on a given file.

Sequences are the training windows (seq_len + 1 tokens, consecutive windows sharing one
token), read in order, so with the same number of batches the loss is exactly the `eval_loss`
the trainer logged. Batches are sharded over the mesh like training batches; the last one is
padded with rows of weight 0, so every window counts once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from paxlite import data as data_lib
from paxlite.config import Config, ConfigError
from paxlite.metrics import Progress
from paxlite.partitioning import resolve
from paxlite.sample import activate, batch_ways, model_mesh


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll_sum(graphdef, state, tokens_bt, weights_b):
  """(sum of token negative log-likelihoods, number of tokens) over rows of weight 1."""
  logits_btv = nnx.merge(graphdef, state)(tokens_bt[:, :-1])
  targets_bt = tokens_bt[:, 1:]
  nll_bt = jax.nn.logsumexp(logits_btv, axis=-1) - jnp.take_along_axis(logits_btv, targets_bt[..., None], -1)[..., 0]
  weights_bt = jnp.broadcast_to(weights_b[:, None], nll_bt.shape)
  return jnp.sum(nll_bt * weights_bt), jnp.sum(weights_bt)


def _windows(cfg: Config, data: str | None, split: str, batch_size: int,
             batches: int | None) -> tuple[Sequence[np.ndarray], str]:
  """The sequences to score and a label saying where they come from."""
  seq_len = cfg.model.seq_len
  if data is None and cfg.data.source == "synthetic":  # endless: `batches` (default eval.batches) of them
    rows = data_lib.make_eval_batches(cfg.data, seq_len=seq_len, batch_size=batch_size,
                                      num_batches=batches or cfg.eval.batches, vocab_size=cfg.model.vocab_size)
    return list(np.concatenate(rows)), "synthetic"
  if data is not None:
    corpus = data_lib.load_corpus(dataclasses.replace(cfg.data, source=data))
    tokens, label = np.load(corpus.cache_path, mmap_mode="r"), data  # the whole file, both "splits"
  else:
    corpus = data_lib.load_corpus(cfg.data)
    tokens, label = (corpus.val if split == "val" else corpus.train), f"{split} split of {cfg.data.source}"
  if corpus.tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"data.tokenizer: {corpus.tokenizer.vocab_size} tokens do not fit "
                      f"model.vocab_size={cfg.model.vocab_size}")
  windows = data_lib.TokenWindows(tokens, seq_len)
  if not len(windows):
    raise ConfigError(f"{'--data' if data else 'data.source'}: {label} holds {tokens.shape[0]} tokens, fewer than one "
                      f"sequence of model.seq_len+1 = {seq_len + 1}")
  return windows, label


def evaluate(model: nnx.Module, cfg: Config, *, data: str | None = None, split: str = "val",
             batches: int | None = None, batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Mean token loss and perplexity of `model` (e.g. from paxlite.load_run) on sequences of
  cfg.model.seq_len + 1 tokens: all windows of the run's `split` ('val' or 'train'), or of
  the text/JSONL file or directory `data` (tokenized with the run's tokenizer); at most
  `batches` batches of `batch_size` (default train.batch_size) sequences."""
  if split not in ("val", "train"):
    raise ConfigError(f"--split: expected val or train, got {split!r}")
  for name, value in (("--batches", batches), ("--batch-size", batch_size)):
    if value is not None and value <= 0:
      raise ConfigError(f"{name}: expected a positive integer, got {value}")
  batch_size = batch_size or cfg.train.batch_size
  windows, label = _windows(cfg, data, split, batch_size, batches)
  count = len(windows) if batches is None else min(len(windows), batches * batch_size)

  mesh = model_mesh(model)
  padded = batch_size
  if mesh is not None:
    ways = batch_ways(mesh, cfg.rules)
    padded = -(-batch_size // ways) * ways  # dummy rows of weight 0 fill the devices
  graphdef, state = nnx.split(model)
  num_batches = -(-count // batch_size)
  bar = Progress(total=num_batches, mode=cfg.run.progress, enabled=progress)
  sums = []
  try:
    for start in range(0, count, batch_size):
      rows = [windows[i] for i in range(start, min(start + batch_size, count))]
      tokens_bt = np.zeros((padded, cfg.model.seq_len + 1), np.int32)
      tokens_bt[: len(rows)] = np.stack(rows)
      weights_b = (np.arange(padded) < len(rows)).astype(np.float32)
      if mesh is not None:
        tokens_bt = jax.device_put(tokens_bt, NamedSharding(mesh, resolve(("batch", "length"), cfg.rules)))
        weights_b = jax.device_put(weights_b, NamedSharding(mesh, resolve(("batch",), cfg.rules)))
      with activate(mesh, cfg.rules):
        sums.append(_nll_sum(graphdef, state, tokens_bt, weights_b))
      jax.block_until_ready(sums[-1])  # so that the bar shows work done, not work queued
      bar.update()
    total_nll, total_tokens = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
  finally:
    bar.close()
  loss = float(total_nll / total_tokens)
  return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(total_tokens), "sequences": count,
          "source": label}
