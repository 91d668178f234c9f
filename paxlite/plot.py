"""Loss curves of one or more runs from their metrics.jsonl, drawn with matplotlib."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from paxlite.config import ConfigError


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
  """The records of run_dir/metrics.jsonl (a torn last line from a killed run is skipped)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ConfigError(f"run directory '{run_dir}' has no metrics.jsonl (expected a paxlite run directory)")
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def plot_runs(run_dirs: Sequence[str], out_path: str) -> str:
  """Writes a figure with training and validation loss (left) and learning rate (right)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise ConfigError("paxlite plot needs matplotlib: pip install matplotlib") from None
  fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
  for run_dir in run_dirs:
    records = read_metrics(run_dir)
    name = os.path.basename(os.path.normpath(run_dir))
    steps = [r["step"] for r in records if r.get("loss") is not None]
    line, = ax_loss.plot(steps, [r["loss"] for r in records if r.get("loss") is not None], label=f"{name} train")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
      ax_loss.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{name} validation")
    ax_lr.plot(steps, [r.get("lr") for r in records if r.get("loss") is not None], label=name)
  ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
  ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)
  ax_lr.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path
