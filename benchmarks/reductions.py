"""Two reductions of the train step, timed alone on the 1.7B model's shapes, each against the
bytes it must read:

- the loss's logsumexp over [16384, 50304] bf16 logits: jax.nn.logsumexp (a max, then a sum:
  two passes) against paxlite.trainer.logsumexp_one_pass (one reduction of (max, sum) pairs);
- the gradients' global norm over one stacked kernel's gradient, which in the unrolled step is
  the concatenation of 24 layers' [8192, 2048] bf16 pieces (round 30's profile: 0.5 ms on an
  H100 where the bytes take 0.27): over the concatenation as optax.tree.norm sums it, per
  layer first (axis 0 kept), and per piece (the reduction never sees the concatenation).

  PYTHONPATH=. python benchmarks/reductions.py [--reps 100]
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from norm_kernels import timed  # this folder's: the script's own directory is on sys.path

from paxlite.trainer import logsumexp_one_pass


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=100)
  parser.add_argument("--layers", type=int, default=24)
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), args.layers + 1)

  logits = (4 * jax.random.normal(keys[0], (16384, 50304), jnp.float32)).astype(jnp.bfloat16)
  two = jax.jit(lambda x: jax.nn.logsumexp(x.astype(jnp.float32), axis=-1))
  one = jax.jit(lambda x: logsumexp_one_pass(x.astype(jnp.float32)))
  gb = logits.size * 2 / 1e9
  diff = float(jnp.max(jnp.abs(two(logits) - one(logits))))
  rows = []
  for name, f in (("logsumexp, jax.nn (two passes)", two), ("logsumexp, one pass", one)):
    t = timed(f, (logits,), args.reps)
    rows.append((name, t, gb / t))
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
  print(f"largest logsumexp difference {diff:.2e}; sums of squares {values}")


if __name__ == "__main__":
  main()
