"""What keeping the unrolled blocks' parameters layer by layer would save, timed alone on the
1.7B model's block kernels: the optimizer's update plus the cast to bf16 that the next step's
GEMMs read.

- stacked (paxlite today): each kernel is one [24, ...] float32 array, its AdamW moments too.
  The update reads the 24 layers' bf16 gradients (their concatenation fuses into it) and
  writes the stacked params and moments; the next step then casts the stacked params to bf16
  and splits them into the 24 layers' kernels in a pass of its own (round 34's profile: 3.2 ms
  of an H100 step). The two are timed as two jitted calls, as they are two steps apart.
- per layer: 24 float32 arrays per kernel (moments too); each layer's update also writes its
  bf16 copy, in the same pass, for the next step's GEMMs to read as they are.

  PYTHONPATH=. python benchmarks/optimizer_layout.py [--reps 20] [--layers 24]

Round 42 measured it; paxlite/step_state.py (precision.compute_copy) now trains this way, and
rounds 45-48 measured the step (benchmarks/RESULTS.md).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

# One decoder block's kernels in configs/bench-1.7b.yaml (d_model 2048, 16 heads of 128, 16 kv
# heads, SwiGLU 8192).
BLOCK_KERNELS = {
    "q": (2048, 16, 128), "k": (2048, 16, 128), "v": (2048, 16, 128), "o": (16, 128, 2048),
    "gate": (2048, 8192), "up": (2048, 8192), "down": (8192, 2048),
}


def timed(f, state, grads, reps):
  """Seconds per call of f(state, grads) -> (state, extra), the state handed on (donated)."""
  for _ in range(2):
    state, extra = f(state, grads)
  jax.block_until_ready((state, extra))
  start = time.perf_counter()
  for _ in range(reps):
    state, extra = f(state, grads)
  jax.block_until_ready((state, extra))
  return (time.perf_counter() - start) / reps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--layers", type=int, default=24)
  args = parser.parse_args()
  layers = args.layers
  tx = optax.adamw(3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  keys = dict(zip(BLOCK_KERNELS, jax.random.split(jax.random.key(0), len(BLOCK_KERNELS))))
  grads = {name: [(1e-3 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16)
                  for k in jax.random.split(keys[name], layers)] for name, shape in BLOCK_KERNELS.items()}
  count = sum(layers * a.size for a, *_ in grads.values())

  def update(state, grads32):
    params, opt_state = state
    updates, opt_state = tx.update(grads32, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # Stacked: the update, then (the next step) the cast and split.
  @jax.jit(donate_argnums=0)
  def stacked_update(state, grads):
    return update(state, {n: jnp.concatenate([g[None] for g in gs]).astype(jnp.float32) for n, gs in grads.items()}), None

  cast_and_split = jax.jit(lambda params: {n: [p[i].astype(jnp.bfloat16) for i in range(layers)] for n, p in params.items()})

  def stacked_step(state, grads):
    state, _ = stacked_update(state, grads)
    return state, cast_and_split(state[0])

  # Per layer: the update writes the bf16 copies in its own pass.
  @jax.jit(donate_argnums=0)
  def per_layer_step(state, grads):
    params, opt_state = update(state, jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    return (params, opt_state), jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)

  @jax.jit(donate_argnums=0)
  def per_layer_update(state, grads):
    return update(state, jax.tree.map(lambda g: g.astype(jnp.float32), grads)), None

  def fresh(per_layer):
    params = {n: jnp.zeros((layers, *shape), jnp.float32) for n, shape in BLOCK_KERNELS.items()}
    if per_layer:
      params = {n: [p[i] for i in range(layers)] for n, p in params.items()}
    return params, tx.init(params)

  rows = []
  for name, f, per_layer in (("stacked: update, then cast and split", stacked_step, False),
                             ("stacked: update alone", stacked_update, False),
                             ("per layer: update writing the bf16 copies", per_layer_step, True),
                             ("per layer: update alone", per_layer_update, True)):
    rows.append((name, timed(f, fresh(per_layer), grads, args.reps)))
  # Bytes the update must move: params and moments read and written (float32), the bf16
  # gradients read; the bf16 copies written where made.
  update_gb = count * (6 * 4 + 2) / 1e9
  print(f"{count / 1e9:.2f}B block parameters over {layers} layers; the update moves {update_gb:.1f} GB, "
        f"the copies {count * 2 / 1e9:.1f} GB more")
  print(f"{'variant':<44} {'ms':>8}")
  for name, t in rows:
    print(f"{name:<44} {t * 1e3:>8.3f}")


if __name__ == "__main__":
  main()
