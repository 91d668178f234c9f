"""How far each precision ends from float32 on configs/tiny.yaml, against how far float32 ends
from itself when the learning rate moves by a hair: the noise floor under the 2% tolerance of
the convergence test in notebooks/numerics.ipynb (which the test suite runs).

Every precision trains once per learning-rate multiplier (default 0.997 ... 1.003 of the base
rate) on the same batches; the table gives, per precision, its gap to the float32 run of the
same rate (mean, std, range over the rates). CPU, about 7 minutes on 2 cores with the defaults:

  PYTHONPATH=. python benchmarks/precision_spread.py                  # the test's setting
  PYTHONPATH=. python benchmarks/precision_spread.py --lr-factor 1    # tiny.yaml's own rate
"""

import argparse
import os
import tempfile

import jax
import numpy as np

from paxlite.config import load_config
from paxlite.mesh import make_mesh
from paxlite.trainer import Trainer

PRECISIONS = {
    "float32": {},
    "bf16": {"precision.compute": "bfloat16"},
    "fp16": {"precision.compute": "float16"},
    "fp8-current": {"precision.compute": "bfloat16", "precision.fp8": "current"},
    "fp8-delayed": {"precision.compute": "bfloat16", "precision.fp8": "delayed"},
}


def tail_loss(path: str, overrides: dict, tail: int) -> float:
  """Mean training loss of the last `tail` steps of one single-device run."""
  cfg = load_config(path, {**overrides, "mesh.data": 1, "train.log_every": 1, "eval.every": 0, "checkpoint.every": 0,
                           "run.tensorboard": False, "run.progress": "none", "run.dir": tempfile.mkdtemp()})
  history = Trainer(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:1])).train()
  losses = np.array([r["loss"] for r in history])
  return float(losses[-tail:].mean()) if np.isfinite(losses).all() else float("nan")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"))
  parser.add_argument("--seq", type=int, default=32)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--tail", type=int, default=30)
  parser.add_argument("--lr-factor", type=float, default=None,
                      help="multiplies the config's lr (default: sqrt(seq / the config's seq_len), Adam's "
                           "square-root rule for the smaller batch)")
  parser.add_argument("--multipliers", default="0.997,0.998,0.999,1,1.001,1.002,1.003")
  args = parser.parse_args()
  base = load_config(args.config)
  factor = args.lr_factor if args.lr_factor is not None else (args.seq / base.model.seq_len) ** 0.5
  multipliers = [float(m) for m in args.multipliers.split(",")]
  losses = {name: [] for name in PRECISIONS}
  for m in multipliers:
    for name, overrides in PRECISIONS.items():
      run = {**overrides, "model.seq_len": args.seq, "train.steps": args.steps, "train.lr": base.train.lr * factor * m}
      losses[name].append(tail_loss(args.config, run, args.tail))
      print(f"lr x{factor * m:.4f} {name:12s} {losses[name][-1]:.4f}", flush=True)
  ref = np.array(losses["float32"])
  print(f"\nseq {args.seq}, {args.steps} steps, lr {base.train.lr * factor:.3g} x {multipliers}; "
        f"float32: mean {ref.mean():.4f}, std {100 * ref.std(ddof=1) / ref.mean():.2f}% across rates")
  print(f"{'precision':12s} {'mean gap':>9s} {'std':>6s} {'min':>7s} {'max':>7s}  (% against float32 at the same rate)")
  for name in list(PRECISIONS)[1:]:
    gap = 100 * (np.array(losses[name]) / ref - 1)
    print(f"{name:12s} {gap.mean():+9.2f} {gap.std(ddof=1):6.2f} {gap.min():+7.2f} {gap.max():+7.2f}")


if __name__ == "__main__":
  main()
