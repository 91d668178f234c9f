"""Decoding speed of paxlite.sample.generate on a config's model with random weights.

For each batch size: the compile time of the first call, then the median of 3 timed calls
(prefill of `--prompt-len` tokens + `--new` greedy steps, host round trip included), as new
tokens/s, ms per decode step and the KV cache's size; and the share of generated tokens that
equal the argmax of a full forward pass over prompt + output (1.0 in float32; in bf16 the
cached and the full pass round differently, so near-ties may flip and the sequences diverge).

  PYTHONPATH=. python3 benchmarks/decode.py configs/bench-1.7b.yaml [key=value ...] --batch 1 8 32
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paxlite.config import load_config
from paxlite.sample import _generate, generate
from paxlite.trainer import Trainer


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("config")
  parser.add_argument("overrides", nargs="*")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--new", type=int, default=256)
  args = parser.parse_args()
  cfg = load_config(args.config, args.overrides)
  trainer = Trainer(cfg)
  params = trainer.init_state()["params"]
  model = nnx.merge(trainer.graphdef, params)
  m = cfg.model
  head_dim = m.head_dim or m.d_model // m.num_heads
  forward = jax.jit(lambda state, tokens: nnx.merge(trainer.graphdef, state)(tokens).argmax(-1))
  for batch in args.batch:
    prompts = np.random.default_rng(0).integers(0, m.vocab_size, (batch, args.prompt_len))
    run = lambda: generate(model, prompts, max_new_tokens=args.new, rules=cfg.rules)  # noqa: E731
    start = time.perf_counter()
    out = run()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(3):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    full = np.concatenate([prompts, out], axis=1)
    argmax = np.asarray(forward(params, jnp.asarray(full, jnp.int32)))
    agree = float(np.mean(argmax[:, args.prompt_len - 1 : -1] == out))
    cache_len = max(16, 1 << (args.prompt_len - 1).bit_length()) + args.new
    cache_gb = 2 * m.num_layers * batch * cache_len * (m.num_kv_heads or m.num_heads) * head_dim
    cache_gb *= jnp.dtype(cfg.precision.compute).itemsize / 1e9
    print(json.dumps({"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new,
                      "compile_s": round(compile_s - seconds, 2), "seconds": round(seconds, 4),
                      "new_tokens_per_s": round(batch * args.new / seconds, 1),
                      "ms_per_step": round(1e3 * seconds / args.new, 3), "kv_cache_gb": round(cache_gb, 3),
                      "greedy_matches_full_forward": round(agree, 4), "programs": _generate._cache_size()}))


if __name__ == "__main__":
  main()
