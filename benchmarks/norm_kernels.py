"""The fused residual-add + RMSNorm kernels (paxlite.models.norm_kernels) against XLA's own
fusions of the same arithmetic, at the 1.7B model's activation shape [16384, 2048] bf16.

  PYTHONPATH=. python benchmarks/norm_kernels.py [--rows 16384] [--dim 2048] [--reps 200]

Prints, per case, the time of each implementation, the bandwidth over the minimal bytes (each
input read once, each output written once), and the largest difference between their outputs.
Cases: the forward with a residual add; the backward adding the residual stream's gradient;
and that backward when the norm's output gradient comes in three parts (q, k and v's input
gradients), which both sum in their own passes.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from paxlite.models import norm_kernels as nk


# (rows per forward program or backward step, rows per backward program, warps). Triton's
# software pipelining of the backward's loop (num_stages 1 to 4) changed nothing (round 35).
VARIANTS = [(2, 64, 4), (4, 32, 4), (4, 128, 4), (4, 256, 4), (4, 64, 2), (4, 64, 8), (2, 64, 2), (1, 64, 1)]


def timed(f, args, reps):
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  start = time.perf_counter()
  for _ in range(reps):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def biggest_difference(a, b):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", type=int, default=16384)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--reps", type=int, default=200)
  args = parser.parse_args()
  n, d = args.rows, args.dim
  keys = jax.random.split(jax.random.key(0), 8)
  act = lambda k: jax.random.normal(k, (n, d), jnp.float32).astype(jnp.bfloat16)
  residual, delta, dy, stream, dy2, dy3 = (act(k) for k in keys[:6])
  scale = 1 + 0.1 * jax.random.normal(keys[6], (d,), jnp.float32)
  eps = 1e-5
  x, _, inv = nk.add_rms_norm_fwd_xla(residual, delta, scale, eps)
  mb = n * d * 2 / 1e6  # one activation, MB

  cases = {
      "forward, residual add": (
          lambda r, dl, s: nk.add_rms_norm_fwd_xla(r, dl, s, eps),
          lambda r, dl, s: nk.add_rms_norm_fwd_pallas(r, dl, s, eps),
          (residual, delta, scale), 4 * mb),
      "backward + stream": (
          lambda g, xx, i, s, st: nk.rms_norm_bwd_xla((g,), xx, i, s, st),
          lambda g, xx, i, s, st: nk.rms_norm_bwd_pallas((g,), xx, i, s, st),
          (dy, x, inv, scale, stream), 4 * mb),
      "backward + stream, dy = 3 parts": (
          lambda a, b, c, xx, i, s, st: nk.rms_norm_bwd_xla((a, b, c), xx, i, s, st),
          lambda a, b, c, xx, i, s, st: nk.rms_norm_bwd_pallas((a, b, c), xx, i, s, st),
          (dy, dy2, dy3, x, inv, scale, stream), 6 * mb),
  }
  print(f"[{n}, {d}] bf16; minimal traffic per case in MB: 1 activation = {mb:.0f}")
  print(f"{'case':34s} {'impl':22s} {'us':>8s} {'GB/s':>7s} {'max |diff|':>11s}")
  for name, (xla_fn, pallas_fn, inputs, traffic) in cases.items():
    reference = jax.jit(xla_fn)
    t = timed(reference, inputs, args.reps)
    print(f"{name:34s} {'xla':22s} {t * 1e6:8.1f} {traffic / 1e3 / t:7.0f}")
    expected = reference(*inputs)
    # The module's defaults first (the forward's rows per program there are the backward's).
    fwd_rows = nk._FWD_ROWS
    defaults = (nk._BWD_ROWS, nk._BWD_PROGRAM_ROWS, nk._NUM_WARPS)
    for rows, program_rows, warps in [defaults] + VARIANTS:
      if name.startswith("forward") and program_rows != defaults[1]:
        continue  # the forward has no program rows: one timing per (rows, warps)
      nk._FWD_ROWS = nk._BWD_ROWS = rows
      nk._BWD_PROGRAM_ROWS, nk._NUM_WARPS = program_rows, warps
      label = f"pallas r{rows}/{program_rows} w{warps}"
      f = jax.jit(lambda *a: pallas_fn(*a))  # a new function, a new trace: block sizes are read when tracing
      try:
        t = timed(f, inputs, args.reps)
        diff = biggest_difference(expected, f(*inputs))
        print(f"{name:34s} {label:22s} {t * 1e6:8.1f} {traffic / 1e3 / t:7.0f} {diff:11.2e}")
      except Exception as e:  # a block shape Triton rejects: report and go on
        print(f"{name:34s} {label:22s} failed: {str(e).splitlines()[0][:80]}")
    nk._FWD_ROWS, nk._BWD_ROWS = fwd_rows, defaults[0]
    nk._BWD_PROGRAM_ROWS, nk._NUM_WARPS = defaults[1:]


if __name__ == "__main__":
  main()
