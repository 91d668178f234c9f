"""Numerics: the dtype policy, fp16 dynamic loss scaling, and fp8 matrix multiplies.

Policy: parameters are stored in `precision.params`, activations and matrix multiplies run
in `precision.compute`; norms, softmax and the loss run in float32 whatever the policy.

fp8 (`precision.fp8`): the decoder blocks' projections (attention q/k/v/o, MLP gate/up/down)
multiply in fp8 with the "hybrid" formats: e4m3 (more mantissa) for activations and weights
in the forward pass, e5m2 (more range) for output gradients in the backward pass. Each
tensor is scaled into its fp8 range by a per-tensor power-of-two scale s (x ~ q * s):
  * `current`: s from the tensor's own amax at this step;
  * `delayed`: s from the max of an amax history (`Fp8History`, one per projection and
    layer, kept in the train state), which this step's amaxes are pushed into.
The matmul is written the way XLA's GPU compiler turns it into a cuBLASLt fp8 GEMM: the
operands are converted to fp8 and multiplied by `dot_general` directly with a wider output
type, then the output is multiplied by the scalar s_a * s_b (flax/linen/fp8_ops.py's "direct"
form). Power-of-two scales make quantising and dequantising exact apart from the fp8
rounding itself, in any compute dtype.

Delayed scaling and autodiff: the output-gradient amax only exists in the backward pass, so
every amax of a step leaves it as a gradient: each projection also holds an `Fp8Seen`
variable, all zeros, whose gradient is a one-hot vector of the power-of-two scale each of its
three tensors needed this step. Gradients add wherever a layer is used more than once (the
micro-batches of gradient accumulation or of a pipeline, a layer closed over by a scan), and
a sum of one-hot vectors still shows the largest scale any use needed: amaxes combine by max,
never by sum or last-wins, with no special case in any of those places. `update_histories`
pushes the result into the `Fp8History` (which the optimizer never sees). A use whose output
gradient is zero (a pipeline bubble) records nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from paxlite.config import PrecisionConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FORWARD_FP8 = jnp.float8_e4m3fn   # activations and weights: 3 mantissa bits, max 448
BACKWARD_FP8 = jnp.float8_e5m2    # output gradients: 2 mantissa bits, max 57344
# The rows of an Fp8History / Fp8Seen: the matmul's input, kernel and output gradient.
ROW_DTYPES = (FORWARD_FP8, FORWARD_FP8, BACKWARD_FP8)
# Scale exponents k (scale 2^k) recorded by Fp8Seen: float32 normals, with room for fp8 max * 2^k.
MIN_EXP, MAX_EXP = -126, 110
SCALE_BINS = MAX_EXP - MIN_EXP + 1
# checkpoint_name of what an fp8 matmul keeps for its backward pass (quantised operands, scales,
# amaxes): remat policies that save it spare the backward pass re-quantising the operands.
FP8_RESIDUALS = "fp8_residuals"


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
  """How the decoder projections multiply in fp8."""
  mode: str
  """current | delayed."""
  history: int
  """Amax history length (delayed scaling)."""


@dataclasses.dataclass(frozen=True)
class DtypePolicy:
  param_dtype: jnp.dtype
  compute_dtype: jnp.dtype
  fp8: Fp8Recipe | None = None
  fp8_head: bool = False  # the output head's matmul in fp8 too (with `fp8`'s recipe)

  @classmethod
  def from_config(cls, precision: PrecisionConfig) -> "DtypePolicy":
    fp8 = None if precision.fp8 == "none" else Fp8Recipe(precision.fp8, precision.fp8_history)
    return cls(param_dtype=_DTYPES[precision.params], compute_dtype=_DTYPES[precision.compute], fp8=fp8,
               fp8_head=precision.fp8_head and fp8 is not None)


# ---------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------


def fp8_max(dtype) -> float:
  return float(jnp.finfo(dtype).max)


def amax(x: jax.Array) -> jax.Array:
  """Largest magnitude of `x` as a float32 scalar."""
  return jnp.max(jnp.abs(x)).astype(jnp.float32)


def scale_exponent(amax_value: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """(k, ok): 2^k is the smallest power of two with amax / 2^k <= the fp8 maximum; ok is False
  when amax is 0 or not finite. From the exponent bits (frexp), not log2, whose GPU
  approximation is inexact."""
  ok = jnp.isfinite(amax_value) & (amax_value > 0)
  mantissa, exponent = jnp.frexp(jnp.where(ok, amax_value, 1.0) / fp8_max(dtype))  # m * 2^e, m in [0.5, 1)
  exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
  return jnp.clip(exponent, MIN_EXP, MAX_EXP).astype(jnp.int32), ok


def _pow2(k: jax.Array) -> jax.Array:
  """2^k for integer k in float32's normal range, exactly (a bitcast, not exp2)."""
  return jax.lax.bitcast_convert_type((k + 127).astype(jnp.int32) << 23, jnp.float32)


def scale_for(amax_value: jax.Array, dtype) -> jax.Array:
  """The power-of-two scale s for a tensor of this amax (x ~ q * s); 1 for amax 0 or not finite.

  A power of two costs at most one bit of range against amax / max exactly, and buys exact
  scaling: x / s and q * s lose nothing in bfloat16 or float32.
  """
  k, ok = scale_exponent(amax_value, dtype)
  return jnp.where(ok, _pow2(k), 1.0)


def quantize(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """x / scale rounded to `dtype`, saturating: e4m3fn has no infinity, a value past its max
  (a delayed scale that is too small) would become NaN."""
  limit = fp8_max(dtype)
  return jnp.clip(x * (1.0 / scale).astype(x.dtype), -limit, limit).astype(dtype)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return q.astype(dtype) * scale.astype(dtype)


def push_amax(history: jax.Array, amax_k: jax.Array) -> jax.Array:
  """History [..., tensors, length] with `amax_k` [..., tensors] as the newest column 0."""
  return jnp.concatenate([amax_k[..., None], history[..., :-1]], axis=-1)


def history_scales(history_kh: jax.Array) -> list[jax.Array]:
  """Scales of (input, kernel, grad) from the max over each row's history."""
  amax_k = jnp.max(history_kh, axis=-1)
  return [scale_for(amax_k[row], dtype) for row, dtype in enumerate(ROW_DTYPES)]


def scale_one_hot(amax_k: jax.Array) -> jax.Array:
  """[3] amaxes (input, kernel, grad) -> [3, SCALE_BINS]: a one at the exponent of the scale
  each needs, nothing for an amax of 0 or not finite."""
  rows = []
  for row, dtype in enumerate(ROW_DTYPES):
    k, ok = scale_exponent(amax_k[row], dtype)
    rows.append(jax.nn.one_hot(k - MIN_EXP, SCALE_BINS, dtype=jnp.float32) * ok)
  return jnp.stack(rows)


def seen_amax(seen: jax.Array) -> jax.Array:
  """[..., 3, SCALE_BINS] sums of one-hot vectors -> [..., 3] amaxes: the largest value the
  largest scale seen covers (fp8 max * 2^k), which gives back exactly that scale; 0 if none."""
  found = seen > 0
  top = SCALE_BINS - 1 - jnp.argmax(found[..., ::-1], axis=-1)  # highest bin with a count
  limits = jnp.asarray([fp8_max(d) for d in ROW_DTYPES], jnp.float32)
  return jnp.where(found.any(axis=-1), limits * _pow2(top + MIN_EXP), 0.0)


def update_histories(histories: Any, seen: Any) -> Any:
  """Pushes the amaxes of a step's summed `Fp8Seen` gradients into the matching histories
  (trees whose leaves pair up in order: one history and one seen per projection)."""
  hist_leaves, treedef = jax.tree_util.tree_flatten_with_path(histories)
  seen_leaves = jax.tree_util.tree_flatten_with_path(seen)[0]
  if [p[:-1] for p, _ in hist_leaves] != [p[:-1] for p, _ in seen_leaves]:
    raise ValueError("fp8 histories and seen amaxes do not pair up")
  return jax.tree.unflatten(treedef, [push_amax(h, seen_amax(s)) for (_, h), (_, s) in zip(hist_leaves, seen_leaves)])


# ---------------------------------------------------------------------------------------
# The fp8 einsum
# ---------------------------------------------------------------------------------------


class Fp8History(nnx.Variable):
  """Amax history of one fp8 matmul, float32 [3, fp8_history]: rows input, kernel and output
  gradient, column 0 the newest, each amax rounded up to the top of its
  power-of-two scale's range. Not a parameter: the optimizer never sees it."""


class Fp8Seen(nnx.Variable):
  """All zeros, [3, SCALE_BINS]: its gradient counts, per tensor, the scale exponents this
  step's uses needed. Not stored in the train state; see the module docstring."""


def new_fp8_state(length: int) -> tuple[Fp8History, Fp8Seen]:
  # Zeros mean "no amax seen": the first step uses scale 1 (see scale_for), as Transformer
  # Engine and Flax's fp8_ops do. That flushes most of the first step's small e5m2 output
  # gradients to zero (56-99% in some projections of configs/tiny.yaml), at the warm-up's
  # smallest rate. Falling back to each tensor's own amax while its history is empty would make
  # every step's quantisation wait for an amax pass (the read delayed scaling saves); in runs
  # of 7 learning rates each, it moved the final loss by 0.3% either way, within their spread.
  return (Fp8History(jnp.zeros((3, length), jnp.float32), out_sharding=(None, None)),
          Fp8Seen(jnp.zeros((3, SCALE_BINS), jnp.float32), out_sharding=(None, None)))


def split_equation(equation: str) -> tuple[str, str, str]:
  """'btd,dnh->btnh' -> ('btd', 'dnh', 'btnh'), checked to be a projection whose gradients
  are einsums too: every letter appears in exactly two of the three terms, or in all three
  (a batch dimension)."""
  inputs, arrow, out = equation.replace(" ", "").partition("->")
  terms = inputs.split(",")
  if not arrow or len(terms) != 2:
    raise ValueError(f"fp8 einsum '{equation}': expected 'lhs,rhs->out'")
  lhs, rhs = terms
  for letter in set(lhs + rhs + out):
    if (letter in lhs) + (letter in rhs) + (letter in out) < 2:
      raise ValueError(f"fp8 einsum '{equation}': '{letter}' is summed within one operand")
  return lhs, rhs, out


def _scaled_einsum(equation: str, a: jax.Array, b: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  # fp8 operands straight into dot_general with a wide output type, then one scalar multiply:
  # the form XLA's GPU GEMM rewriter turns into a cuBLASLt fp8 matmul with its scales.
  return jnp.einsum(equation, a, b, preferred_element_type=dtype) * scale.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_einsum(equation: str, x: jax.Array, w: jax.Array, history: jax.Array | None,
                seen: jax.Array | None, input_history: jax.Array | None) -> jax.Array:
  return _fp8_einsum_fwd(equation, x, w, history, seen, input_history)[0]


def _fp8_einsum_fwd(equation, x, w, history, seen, input_history):
  amax_x, amax_w = amax(x), amax(w)
  if history is None:
    s_x, s_w, s_g = scale_for(amax_x, FORWARD_FP8), scale_for(amax_w, FORWARD_FP8), None
  else:
    s_x, s_w, s_g = history_scales(history)
    if input_history is not None:
      s_x = scale_for(jnp.max(input_history), FORWARD_FP8)
  q_x, q_w = quantize(x, s_x, FORWARD_FP8), quantize(w, s_w, FORWARD_FP8)
  y = _scaled_einsum(equation, q_x, q_w, s_x * s_w, x.dtype)
  residuals = (q_x, q_w, s_x, s_w, s_g, amax_x, amax_w)
  return y, tuple(checkpoint_name(r, FP8_RESIDUALS) if r is not None else None for r in residuals) + (history, input_history)


def _fp8_einsum_bwd(equation, residuals, g):
  q_x, q_w, s_x, s_w, s_g, amax_x, amax_w, history, input_history = residuals
  lhs, rhs, out = split_equation(equation)
  amax_g = amax(g)
  if s_g is None:
    s_g = scale_for(amax_g, BACKWARD_FP8)
  q_g = quantize(g, s_g, BACKWARD_FP8)
  dx = _scaled_einsum(f"{out},{rhs}->{lhs}", q_g, q_w, s_g * s_w, g.dtype)
  dw = _scaled_einsum(f"{lhs},{out}->{rhs}", q_x, q_g, s_x * s_g, g.dtype)
  if history is None:
    return dx, dw, None, None, None
  # The scales are piecewise constant in the history: its true gradient is zero. The seen
  # port's "gradient" is what this use observed, unless its output did not matter (g == 0).
  seen = scale_one_hot(jnp.stack([amax_x, amax_w, amax_g])) * (amax_g > 0)
  d_input_history = None if input_history is None else jnp.zeros_like(input_history)
  return dx, dw, jnp.zeros_like(history), seen, d_input_history


_fp8_einsum.defvjp(_fp8_einsum_fwd, _fp8_einsum_bwd)


def fp8_einsum(equation: str, x: jax.Array, w: jax.Array, history: jax.Array | None = None,
               seen: jax.Array | None = None, input_history: jax.Array | None = None) -> jax.Array:
  """einsum(equation, x, w) with both operands in e4m3 and the output gradient in e5m2.

  Current scaling without `history`; delayed scaling from the [3, length] amax history with
  it, and then the gradient with respect to `seen` ([3, SCALE_BINS], zeros) records this
  use's amaxes (see update_histories). x and w must share a dtype, which is the output's (the
  GEMM accumulates in float32 regardless).

  `input_history` ([length], delayed only) replaces the history's input row for the scale of
  x. Projections that read the same x (q, k and v; gate and up) pass the same row, so the
  quantised x is one expression that XLA computes, keeps and transposes once instead of once
  per projection. Their own input rows hold the same amaxes anyway (they see the same x).
  """
  split_equation(equation)
  if x.dtype != w.dtype:
    raise ValueError(f"fp8 einsum '{equation}': operand dtypes differ ({x.dtype}, {w.dtype})")
  if (history is None) != (seen is None):
    raise ValueError(f"fp8 einsum '{equation}': delayed scaling needs both history and seen")
  if input_history is not None and history is None:
    raise ValueError(f"fp8 einsum '{equation}': input_history is for delayed scaling only")
  return _fp8_einsum(equation, x, w, history, seen, input_history)


# ---------------------------------------------------------------------------------------
# Dynamic loss scaling (float16)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossScaler:
  """Dynamic loss scaling: the loss is multiplied by `scale` before differentiation and the
  gradients divided by it after. A step whose gradients are not all finite is skipped and
  halves the scale; `period` finite steps in a row double it."""
  initial: float
  period: int

  @classmethod
  def from_config(cls, precision: PrecisionConfig) -> "LossScaler | None":
    """A scaler when precision.loss_scale asks for one (auto: only with float16 compute)."""
    active = precision.loss_scale == "dynamic" or (precision.loss_scale == "auto" and precision.compute == "float16")
    return cls(precision.loss_scale_init, precision.loss_scale_period) if active else None

  def init(self) -> dict[str, jax.Array]:
    return {"scale": jnp.asarray(self.initial, jnp.float32), "good_steps": jnp.zeros((), jnp.int32),
            "skipped_steps": jnp.zeros((), jnp.int32)}

  def update(self, state: dict[str, jax.Array], finite: jax.Array) -> dict[str, jax.Array]:
    good = jnp.where(finite, state["good_steps"] + 1, 0)
    grow = good >= self.period
    scale = jnp.where(finite, jnp.where(grow, state["scale"] * 2.0, state["scale"]), state["scale"] * 0.5)
    return {"scale": scale, "good_steps": jnp.where(grow, 0, good),
            "skipped_steps": state["skipped_steps"] + jnp.where(finite, 0, 1)}


# ---------------------------------------------------------------------------------------
# Compiled-HLO inspection
# ---------------------------------------------------------------------------------------

# Instruction definitions (`%name = bf16[...]` or a tuple `%name = (bf16[...], ...)`), and
# GEMMs: cuBLAS(Lt) custom calls and Triton GEMM fusions. XLA:GPU's optimised HLO prints
# operands by name alone (`custom-call(%bitcast.12, ...)`); other dumps print their types too.
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*\(?(?P<type>[a-z][a-z0-9]*)\[")
_GEMM = re.compile(
    r"=\s*\S.*?\b(?:custom-call|fusion)\((?P<first>[^,)]*)"
    r".*?(?:custom_call_target=\"(?P<target>__cublas\$[a-zA-Z0-9$]+)\""
    r"|\"kind\":\"(?P<kind>__triton_[a-z_]*gemm[a-z_]*)\"|calls=%gemm_fusion)")


def count_gemms(hlo_text: str) -> dict[str, int]:
  """Counts the GEMMs of compiled GPU HLO (`compiled.as_text()`) by operand type.

  Returns e.g. {'fp8': 21, 'bf16': 3}: 'fp8' counts cuBLASLt fp8 matmuls
  (`__cublas$lt$matmul$f8`) and any other GEMM with fp8 operands; the other keys are the HLO
  element type of the first operand of cuBLAS (`__cublas$gemm`, `__cublas$lt$matmul`) and
  Triton GEMMs. A GEMM inside a loop body (the scanned layers) counts once.
  """
  lines = hlo_text.splitlines()
  types = {}
  for line in lines:
    definition = _DEFINITION.match(line)
    if definition is not None:
      types[definition.group("name")] = definition.group("type")
  counts: Counter[str] = Counter()
  for line in lines:
    match = _GEMM.search(line)
    if match is None:
      continue
    first = match.group("first").strip()
    typed = re.match(r"(?P<type>[a-z][a-z0-9]*)\[", first)
    operand = typed.group("type") if typed else types.get(first.lstrip("%"), "unknown")
    fp8 = (match.group("target") or "").endswith("$f8") or operand.startswith("f8")
    counts["fp8" if fp8 else operand] += 1
  return dict(counts)
