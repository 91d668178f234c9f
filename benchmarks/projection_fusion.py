"""Does one GEMM over stacked kernels beat separate GEMMs? Times the forward and backward of
the 1.7B model's projections (batch 8 x 2048 tokens, d_model 2048, SwiGLU 8192, 16 heads of
128) with float32 kernels cast to bf16, as the train step runs them:

  * MLP: gate and up as two einsums, against one einsum over the kernels stacked [d, 2, f];
  * attention: q, k, v as three einsums, against one over [d, 3, n, h].

  PYTHONPATH=. python benchmarks/projection_fusion.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

B, T, D, F, N, H = (1, 64, 64, 256, 4, 16) if jax.default_backend() == "cpu" else (8, 2048, 2048, 8192, 16, 128)


def timed(fn, *args, reps: int = 20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def mlp_separate(x, gate, up, down):
  g = jnp.einsum("btd,df->btf", x, gate.astype(x.dtype))
  u = jnp.einsum("btd,df->btf", x, up.astype(x.dtype))
  return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, down.astype(x.dtype))


def mlp_stacked(x, gate, up, down):
  gu = jnp.einsum("btd,dcf->btcf", x, jnp.stack([gate, up], axis=1).astype(x.dtype))
  return jnp.einsum("btf,fd->btd", jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1], down.astype(x.dtype))


def qkv_separate(x, q, k, v):
  return sum(jnp.einsum("btd,dnh->btnh", x, w.astype(x.dtype)) for w in (q, k, v))


def qkv_stacked(x, q, k, v):
  y = jnp.einsum("btd,dcnh->btcnh", x, jnp.stack([q, k, v], axis=1).astype(x.dtype))
  return y[:, :, 0] + y[:, :, 1] + y[:, :, 2]


def step(fn):
  """Forward and backward (input and kernel gradients), as in training."""
  def loss(x, *ws):
    return jnp.sum(fn(x, *ws).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def main():
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (B, T, D), jnp.bfloat16)
  mlp_w = [jax.random.normal(k, s, jnp.float32) * 0.02 for k, s in zip(keys[1:], ((D, F), (D, F), (F, D)))]
  att_w = [jax.random.normal(k, (D, N, H), jnp.float32) * 0.02 for k in keys[1:4]]
  mlp_flops = 3 * 2 * B * T * D * F * 3
  qkv_flops = 3 * 2 * B * T * D * N * H * 3
  for name, fn, ws, flops in (("mlp separate", mlp_separate, mlp_w, mlp_flops),
                              ("mlp stacked [d,2,f]", mlp_stacked, mlp_w, mlp_flops),
                              ("qkv separate", qkv_separate, att_w, qkv_flops),
                              ("qkv stacked [d,3,n,h]", qkv_stacked, att_w, qkv_flops)):
    seconds = timed(step(fn), x, *ws)
    print(f"{name:<24} {1e3 * seconds:7.3f} ms  {flops / seconds / 1e12:6.0f} TFLOP/s (GEMM FLOPs)")


if __name__ == "__main__":
  main()
