"""Throughput of the 1.7B model's GEMM shapes under the current XLA flags (and through PyTorch
when it is installed): is XLA's choice of kernel what holds the train step's GEMMs at ~710
TFLOP/s, when an 8192^3 bf16 product through PyTorch has been seen at ~790 on this GPU?

  PYTHONPATH=. XLA_FLAGS=... python benchmarks/gemm_shapes.py [--dtype bf16|fp8] [--label NAME]

Each shape is timed over --reps products (default 50) dispatched back to back, after a
warm-up; random operands; prints one line per shape: M x K x N, the layout, TFLOP/s. With
--reps 2000 the load lasts over a second, as long as several train steps: whether the clock
holds under sustained load (watch it with nvidia-smi) is what this tells apart.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp

# (M, K, N, what): tokens 16384 = batch 8 x seq 2048, d_model 2048, d_ff 8192.
SHAPES = [
    (8192, 8192, 8192, "square"),
    (16384, 2048, 8192, "gate/up forward"),
    (16384, 8192, 2048, "down forward, gate/up input grad"),
    (2048, 16384, 8192, "gate/up weight grad (x^T dy)"),
    (16384, 2048, 2048, "q/k/v/o forward"),
]


def operands(m, k, n, dtype, transposed_lhs):
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (k, m) if transposed_lhs else (m, k), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (k, n), jnp.float32).astype(dtype)
  return a, b


def time_products(f, a, b, reps):
  f(a, b).block_until_ready()
  f(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(reps):  # one stream: the last product finishes last; earlier outputs are freed
    out = f(a, b)
  out.block_until_ready()
  return (time.perf_counter() - start) / reps


def jax_tflops(m, k, n, dtype, transposed_lhs, reps=50):
  a, b = operands(m, k, n, dtype, transposed_lhs)
  if transposed_lhs:  # contraction over the leading (token) axis of both, as a weight gradient
    f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16))
  else:
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.bfloat16))
  return 2 * m * k * n / time_products(f, a, b, reps) / 1e12


def torch_tflops(m, k, n, transposed_lhs):
  import torch
  a = torch.randn((k, m) if transposed_lhs else (m, k), device="cuda", dtype=torch.bfloat16)
  b = torch.randn((k, n), device="cuda", dtype=torch.bfloat16)
  f = (lambda x, y: x.t() @ y) if transposed_lhs else (lambda x, y: x @ y)
  for _ in range(3):
    f(a, b)
  torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(50):
    f(a, b)
  torch.cuda.synchronize()
  return 2 * m * k * n / ((time.perf_counter() - start) / 50) / 1e12


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"])
  parser.add_argument("--label", default=os.environ.get("XLA_FLAGS", "default flags"))
  parser.add_argument("--torch", action="store_true", help="time the same shapes through PyTorch instead")
  parser.add_argument("--reps", type=int, default=50, help="products per timing (2000: ~1.4 s of load)")
  parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default all)")
  args = parser.parse_args()
  dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float8_e4m3fn
  shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
  for m, k, n, what in shapes:
    transposed = "weight grad" in what
    if args.torch:
      value, label = torch_tflops(m, k, n, transposed), "torch"
    else:
      value, label = jax_tflops(m, k, n, dtype, transposed, args.reps), args.label
    print(f"{label[:60]:<60} {args.dtype} {m:>6} x {k:>6} x {n:>6}  {what:<34} {value:6.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
  main()
