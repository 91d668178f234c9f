"""Two reductions of the train step, timed alone on the 1.7B model's shapes, each against the
bytes it must read:

- the loss's logsumexp over [16384, 50304] bf16 logits: jax.nn.logsumexp (a max, then a sum:
  two passes) against the Pallas kernel of paxlite.loss_kernels (one pass, which also picks up
  the targets' logits), over its rows per program, chunk and warps (--sweep; GPU only). Rounds
  33-34 timed a one-pass XLA reduction of (max, sum) pairs here: 1.11 ms on an H100;
- the gradients' global norm over one stacked kernel's gradient, which in the unrolled step is
  the concatenation of 24 layers' [8192, 2048] bf16 pieces (round 30's profile: 0.5 ms on an
  H100 where the bytes take 0.27): over the concatenation as optax.tree.norm sums it, per
  layer first (axis 0 kept), and per piece (the reduction never sees the concatenation).

  PYTHONPATH=. python benchmarks/reductions.py [--reps 100] [--sweep]
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import optax
from norm_kernels import timed  # this folder's: the script's own directory is on sys.path

from paxlite.loss_kernels import CHUNK, NUM_WARPS, ROWS, log_z_and_target_logit_pallas


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=100)
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--sweep", action="store_true", help="time the loss kernel's block sizes too")
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), args.layers + 1)

  logits = (4 * jax.random.normal(keys[0], (16384, 50304), jnp.float32)).astype(jnp.bfloat16)
  two = jax.jit(lambda x: jax.nn.logsumexp(x.astype(jnp.float32), axis=-1))
  gb = logits.size * 2 / 1e9
  t = timed(two, (logits,), args.reps)
  rows = [("logsumexp, jax.nn (two passes)", t, gb / t)]
  if jax.default_backend() == "gpu":
    targets = jax.random.randint(keys[1], logits.shape[:1], 0, logits.shape[1])
    want = two(logits)
    settings = [(ROWS, CHUNK, NUM_WARPS)]
    if args.sweep:
      settings += [(r, c, w) for r in (1, 2, 4) for c in (1024, 2048, 4096) for w in (4, 8)
                   if (r, c, w) != settings[0]]
    for r, c, w in settings:
      kernel = jax.jit(functools.partial(log_z_and_target_logit_pallas, rows=r, chunk=c, num_warps=w))
      try:
        t = timed(kernel, (logits, targets), args.reps)
      except Exception as e:  # a block too large for the registers: report it, go on
        rows.append((f"Pallas rows {r} chunk {c} warps {w}: {type(e).__name__}", float("nan"), float("nan")))
        continue
      err = float(jnp.max(jnp.abs(kernel(logits, targets)[0] - want)))
      rows.append((f"Pallas rows {r} chunk {c} warps {w} (err {err:.1e})", t, gb / t))
  del logits

  pieces = [jax.random.normal(k, (8192, 2048), jnp.float32).astype(jnp.bfloat16) for k in keys[1:]]
  stack = lambda ps: jnp.concatenate([p[None] for p in ps])
  sq = lambda a: jnp.square(a.astype(jnp.float32))
  variants = {
      "sum of squares, over the concatenation (optax.tree.norm)": lambda ps: jnp.square(optax.tree.norm(stack(ps))),
      "sum of squares, per layer of the concatenation": lambda ps: jnp.sum(jnp.sum(sq(stack(ps)), axis=(1, 2))),
      "sum of squares, per piece": lambda ps: sum(jnp.sum(sq(p)) for p in ps),
  }
  gb = sum(p.size for p in pieces) * 2 / 1e9
  values = []
  for name, f in variants.items():
    f = jax.jit(f)
    values.append(float(f(pieces)))
    t = timed(f, (pieces,), args.reps)
    rows.append((name, t, gb / t))

  print(f"{'reduction':<58} {'ms':>7} {'GB/s':>7}")
  for name, t, rate in rows:
    print(f"{name:<58} {t * 1e3:>7.3f} {rate:>7.0f}")
  print(f"sums of squares {values}")


if __name__ == "__main__":
  main()
