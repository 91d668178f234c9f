"""Dtype policy: parameters stored in one dtype, matrix multiplies in another, softmax and
loss in float32."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from paxlite.config import PrecisionConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DtypePolicy:
  param_dtype: jnp.dtype
  compute_dtype: jnp.dtype

  @classmethod
  def from_config(cls, precision: PrecisionConfig) -> "DtypePolicy":
    return cls(param_dtype=_DTYPES[precision.params], compute_dtype=_DTYPES[precision.compute])
