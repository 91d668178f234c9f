"""FLOPs per token, MFU, and where metrics go: metrics.jsonl, TensorBoard, the terminal."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Mapping

from paxlite.config import ModelConfig

# Peak dense bf16 FLOP/s per device, from the vendors' datasheets (without sparsity).
_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops_for(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s for a known accelerator kind, None for CPUs and unknown kinds."""
  for name, flops in _PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def count_params(model_cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts of paxlite's Transformer: total, embedding table, non-embedding.

  'non_embedding' includes the output head (tied or not), as in the MFU formula.
  """
  m = model_cfg
  d, n = m.d_model, m.num_heads
  k = m.num_kv_heads or n
  h = m.head_dim or d // n
  per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * m.d_ff + 2 * d
  embedding = m.vocab_size * d
  head = m.vocab_size * d
  total = m.num_layers * per_layer + d + embedding + (0 if m.tie_embeddings else head)
  return {"total": total, "embedding": embedding, "non_embedding": m.num_layers * per_layer + d + head}


def flops_per_token(model_cfg: ModelConfig, non_embedding_params: int | None = None) -> float:
  """Model FLOPs per trained token: 6 N + 12 L d T (forward and backward, attention included).

  N is the non-embedding parameter count with the output head; the second term is the
  attention score and value products (PaLM appendix B).
  """
  n = count_params(model_cfg)["non_embedding"] if non_embedding_params is None else non_embedding_params
  return 6.0 * n + 12.0 * model_cfg.num_layers * model_cfg.d_model * model_cfg.seq_len


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX.writer imports torch at
  module level whenever it is installed, only to accept torch tensors, which paxlite never
  passes: ~1.9 s of every `paxlite train` start on a CPU (`python -X importtime`). An import
  that meets None in sys.modules raises ImportError, which tensorboardX handles; the entry is
  removed again at once, so a later `import torch` works as usual."""
  if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    if "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

  `resume_step` is where the run (re)starts: records past it were written by a run killed
  before its next checkpoint, and are about to be written again, so they are dropped (a torn
  last line with them) and TensorBoard is told to purge its events past that step. The file
  then holds one record per step, as an uninterrupted run's would. Only the writing process
  (process 0) should create one.
  """

  def __init__(self, run_dir: str, tensorboard: bool = True, resume_step: int = 0):
    os.makedirs(run_dir, exist_ok=True)
    self._path = os.path.join(run_dir, "metrics.jsonl")
    self._tb_dir = os.path.join(run_dir, "tensorboard") if tensorboard else None
    self._file = self._tb = None
    self._open(resume_step)

  def _open(self, step: int) -> None:
    truncate_records(self._path, step)
    self._file = open(self._path, "a", encoding="utf-8")
    if self._tb_dir is not None:
      SummaryWriter = _summary_writer_class()
      # purge_step: TensorBoard discards this directory's earlier events at steps >= it.
      self._tb = SummaryWriter(logdir=self._tb_dir, purge_step=step + 1 if os.path.isdir(self._tb_dir) else None)

  def rewind(self, step: int) -> None:
    """Forgets the records past `step` (the loop rolled back to it)."""
    self.close()
    self._open(step)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in values.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and value is not None and math.isfinite(value):
          self._tb.add_scalar(key, value, global_step=int(step))

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def truncate_records(path: str, step: int) -> None:
  """Keeps the JSON lines of `path` with "step" <= `step`; rewrites it atomically if needed."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.readlines()
  except FileNotFoundError:
    return
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue  # a line torn by a kill
    if line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int) \
        and record["step"] <= step:
      kept.append(line)
  if kept == lines:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else value
  return value


def _in_notebook() -> bool:
  return "ipykernel" in sys.modules


class Progress:
  """A tqdm bar on a terminal or in a notebook, plain lines otherwise (logs of batch jobs stay
  readable). In a notebook with ipywidgets the bar is tqdm's widget, else its text bar. Mode
  "none" shows neither bar nor metric lines, only messages."""

  def __init__(self, total: int, initial: int = 0, mode: str = "auto", enabled: bool = True):
    self.enabled = enabled
    self.mode = mode
    use_bar = mode == "bar" or (mode == "auto" and (sys.stderr.isatty() or _in_notebook()))
    self._bar = None
    if enabled and use_bar:
      if _in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
      else:
        from tqdm import tqdm

      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

  def update(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def log(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled or self.mode == "none":
      return
    line = format_metrics(step, values)
    if self._bar is not None:
      self._bar.set_postfix_str(_short(values), refresh=False)
      self._bar.write(line, file=sys.stderr)
    else:
      print(line, file=sys.stderr, flush=True)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


_SHOWN = ("loss", "eval_loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "tokens_per_s", "mfu", "step_time_s")


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
  return str(value)


def format_metrics(step: int, values: Mapping[str, Any]) -> str:
  parts = [f"step {step}"] + [f"{k} {_fmt(values[k])}" for k in _SHOWN if values.get(k) is not None]
  return " | ".join(parts)


def _short(values: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={_fmt(values[k])}" for k in ("loss", "tokens_per_s") if values.get(k) is not None)


class Timer:
  """Wall time between marks, for step time over a logging interval."""

  def __init__(self):
    self._last = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    elapsed, self._last = now - self._last, now
    return elapsed
