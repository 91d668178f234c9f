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

Delayed scaling and autodiff: the new history of a projection leaves the backward pass as
the "gradient" of its old history (the output-gradient amax only exists there). Inside the
differentiated function the history is converted to flax's `fp32_max_grad` dtype, whose
cotangents add by max, so a history used several times (a pipeline's micro-batches, a layer
closed over by a scan) combines by max, never by sum; gradient accumulation across
micro-batches combines with `combine_fp8_updates` (max) for the same reason.
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
from flax.linen.fp8_ops import fp32_max_grad

from paxlite.config import PrecisionConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FORWARD_FP8 = jnp.float8_e4m3fn   # activations and weights: 3 mantissa bits, max 448
BACKWARD_FP8 = jnp.float8_e5m2    # output gradients: 2 mantissa bits, max 57344
# Rows of an Fp8History: which tensor of the matmul an amax belongs to.
INPUT, KERNEL, GRAD = 0, 1, 2


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

  @classmethod
  def from_config(cls, precision: PrecisionConfig) -> "DtypePolicy":
    fp8 = None if precision.fp8 == "none" else Fp8Recipe(precision.fp8, precision.fp8_history)
    return cls(param_dtype=DTYPES[precision.params], compute_dtype=DTYPES[precision.compute], fp8=fp8)


# ---------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------


def fp8_max(dtype) -> float:
  return float(jnp.finfo(dtype).max)


def amax(x: jax.Array) -> jax.Array:
  """Largest magnitude of `x` as a float32 scalar."""
  return jnp.max(jnp.abs(x)).astype(jnp.float32)


def scale_for(amax_value: jax.Array, dtype) -> jax.Array:
  """Smallest power of two s with amax / s <= the fp8 maximum; 1 if amax is 0 or not finite.

  A power of two costs at most one bit of range against amax / max exactly, and buys exact
  scaling: x / s and q * s lose nothing in bfloat16 or float32. It is built from the exponent
  bits (frexp, then a bitcast), never from log2 / exp2, whose GPU approximations are inexact.
  """
  ok = jnp.isfinite(amax_value) & (amax_value > 0)
  mantissa, exponent = jnp.frexp(jnp.where(ok, amax_value, 1.0) / fp8_max(dtype))  # m * 2^e, m in [0.5, 1)
  exponent = jnp.clip(jnp.where(mantissa == 0.5, exponent - 1, exponent), -126, 127)  # float32 normals
  power = jax.lax.bitcast_convert_type((exponent + 127).astype(jnp.int32) << 23, jnp.float32)
  return jnp.where(ok, power, 1.0)


def quantize(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """x / scale rounded to `dtype`, saturating: e4m3fn has no infinity, a value past its max
  (a delayed scale that is too small) would become NaN."""
  limit = fp8_max(dtype)
  return jnp.clip(x * (1.0 / scale).astype(x.dtype), -limit, limit).astype(dtype)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return q.astype(dtype) * scale.astype(dtype)


def push_amax(history_kh: jax.Array, amax_k: jax.Array) -> jax.Array:
  """History [tensors, length] with `amax_k` as the newest column 0, the oldest dropped."""
  return jnp.concatenate([amax_k[:, None], history_kh[:, :-1]], axis=1)


def history_scales(history_kh: jax.Array) -> jax.Array:
  """Scales for (input, kernel, grad) from the max over each row's history."""
  h = jax.lax.convert_element_type(history_kh, jnp.float32)
  amax_k = jnp.max(h, axis=1)
  return jnp.stack([scale_for(amax_k[INPUT], FORWARD_FP8), scale_for(amax_k[KERNEL], FORWARD_FP8),
                    scale_for(amax_k[GRAD], BACKWARD_FP8)])


# ---------------------------------------------------------------------------------------
# The fp8 einsum
# ---------------------------------------------------------------------------------------


class Fp8History(nnx.Variable):
  """Amax history of one fp8 matmul, float32 [3, fp8_history]: rows input, kernel and output
  gradient (INPUT, KERNEL, GRAD), column 0 the newest. Not a parameter: the optimizer never
  sees it; the train step replaces it with the history its backward pass returns."""


def new_history(length: int) -> Fp8History:
  # Zeros mean "no amax seen": the first step uses scale 1 (see scale_for).
  return Fp8History(jnp.zeros((3, length), jnp.float32), out_sharding=(None, None))


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
def _fp8_einsum(equation: str, x: jax.Array, w: jax.Array, history: jax.Array | None) -> jax.Array:
  return _fp8_einsum_fwd(equation, x, w, history)[0]


def _fp8_einsum_fwd(equation, x, w, history):
  amax_x, amax_w = amax(x), amax(w)
  if history is None:
    s_x, s_w, s_g = scale_for(amax_x, FORWARD_FP8), scale_for(amax_w, FORWARD_FP8), None
  else:
    s_x, s_w, s_g = history_scales(history)
  q_x, q_w = quantize(x, s_x, FORWARD_FP8), quantize(w, s_w, FORWARD_FP8)
  y = _scaled_einsum(equation, q_x, q_w, s_x * s_w, x.dtype)
  return y, (q_x, q_w, s_x, s_w, s_g, amax_x, amax_w, history)


def _fp8_einsum_bwd(equation, residuals, g):
  q_x, q_w, s_x, s_w, s_g, amax_x, amax_w, history = residuals
  lhs, rhs, out = split_equation(equation)
  amax_g = amax(g)
  if s_g is None:
    s_g = scale_for(amax_g, BACKWARD_FP8)
  q_g = quantize(g, s_g, BACKWARD_FP8)
  dx = _scaled_einsum(f"{out},{rhs}->{lhs}", q_g, q_w, s_g * s_w, g.dtype)
  dw = _scaled_einsum(f"{lhs},{out}->{rhs}", q_x, q_g, s_x * s_g, g.dtype)
  if history is None:
    return dx, dw, None
  # The history's "gradient" is the history itself with this step's amaxes pushed in.
  new = push_amax(jax.lax.convert_element_type(history, jnp.float32), jnp.stack([amax_x, amax_w, amax_g]))
  return dx, dw, jax.lax.convert_element_type(new, history.dtype)


_fp8_einsum.defvjp(_fp8_einsum_fwd, _fp8_einsum_bwd)


def fp8_einsum(equation: str, x: jax.Array, w: jax.Array, history: jax.Array | None = None) -> jax.Array:
  """einsum(equation, x, w) with both operands in e4m3 and the output gradient in e5m2.

  `history` None: current scaling. Otherwise delayed scaling from the [3, length] amax
  history (float32, or fp32_max_grad inside a differentiated function); the gradient with
  respect to it is the history with this step's amaxes pushed in. x and w must share a
  dtype, which is the output's (the GEMM accumulates in float32 regardless).
  """
  split_equation(equation)
  if x.dtype != w.dtype:
    raise ValueError(f"fp8 einsum '{equation}': operand dtypes differ ({x.dtype}, {w.dtype})")
  return _fp8_einsum(equation, x, w, history)


def max_combining(fp8_state: Any) -> Any:
  """The fp8 state in the dtype whose cotangents add by max: apply inside the function being
  differentiated, before the model reads it, so that every use of a history (scan bodies,
  pipeline micro-batches) combines its new amaxes by max."""
  return jax.tree.map(lambda h: jax.lax.convert_element_type(h, fp32_max_grad), fp8_state)


def index_layer(a: jax.Array, i: int) -> jax.Array:
  """a[i] along the leading (layers) axis, also for state converted by `max_combining`, whose
  slices JAX cannot transpose (the fill value of a padded fp32_max_grad array is undefined)."""
  if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.extended):
    return jax.lax.index_in_dim(a, i, keepdims=False)
  return _index_max_combining(a, i)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _index_max_combining(a: jax.Array, i: int) -> jax.Array:
  return jax.lax.convert_element_type(
      jax.lax.index_in_dim(jax.lax.convert_element_type(a, jnp.float32), i, keepdims=False), a.dtype)


def _index_max_combining_fwd(a, i):
  return _index_max_combining(a, i), jnp.zeros(a.shape, jnp.float32)


def _index_max_combining_bwd(i, zeros, ct):
  # -inf is "nothing seen" under max: the other layers' slices are filled in by their own uses.
  full = jnp.full_like(zeros, -jnp.inf).at[i].set(jax.lax.convert_element_type(ct, jnp.float32))
  return (jax.lax.convert_element_type(full, ct.dtype),)


_index_max_combining.defvjp(_index_max_combining_fwd, _index_max_combining_bwd)


def combine_fp8_updates(a: Any, b: Any) -> Any:
  """Combines the new fp8 state of two micro-batches of one step: elementwise max."""
  return jax.tree.map(jnp.maximum, a, b)


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


def all_finite(tree: Any) -> jax.Array:
  """True when every element of every array in `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


# ---------------------------------------------------------------------------------------
# Compiled-HLO inspection
# ---------------------------------------------------------------------------------------

# A GEMM in optimised GPU HLO: a cuBLAS(Lt) custom call, or a Triton GEMM fusion.
_GEMM = re.compile(
    r"=\s*\S.*?\b(?:custom-call|fusion)\((?P<operand>[a-z0-9]+)\[.*?"
    r"(?:custom_call_target=\"(?P<target>__cublas\$[a-zA-Z0-9$]+)\"|\"kind\":\"(?P<kind>__triton_[a-z_]*gemm[a-z_]*)\")")


def count_gemms(hlo_text: str) -> dict[str, int]:
  """Counts the GEMMs of compiled GPU HLO (`compiled.as_text()`) by operand type.

  Returns e.g. {'fp8': 21, 'bf16': 3}: 'fp8' counts cuBLASLt fp8 matmuls
  (`__cublas$lt$matmul$f8`) and any other GEMM with fp8 operands; the other keys are the HLO
  element type of the first operand of cuBLAS (`__cublas$gemm`, `__cublas$lt$matmul`) and
  Triton GEMMs. A GEMM inside a loop body (the scanned layers) counts once.
  """
  counts: Counter[str] = Counter()
  for line in hlo_text.splitlines():
    match = _GEMM.search(line)
    if match is None:
      continue
    operand = match.group("operand")
    fp8 = (match.group("target") or "").endswith("$f8") or operand.startswith("f8")
    counts["fp8" if fp8 else operand] += 1
  return dict(counts)
