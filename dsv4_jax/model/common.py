"""Building blocks shared by every module: parameter creation with logical axes, RMSNorm, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
  """Model state that is loaded and saved but never receives gradients (hash table, routing bias)."""


def param(rngs: nnx.Rngs, shape, logical_axes, dtype, *, std: float | None = None, init: str = "normal"):
  """A `nnx.Param` carrying its logical sharding axes (see `dsv4_jax.sharding`).

  `init`: "normal" (std defaults to fan_in**-0.5, fan_in = first dim), "ones", "zeros".
  """
  assert len(shape) == len(logical_axes), (shape, logical_axes)
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    if std is None:
      std = shape[0] ** -0.5
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(logical_axes))


def rms_normalize(x, eps: float):
  """Weightless RMS normalisation over the last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale; float32 math, output in the input dtype (as the official code)."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, (dim,), ("norm",), param_dtype, init="ones")

  def __call__(self, x):
    y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
    return y.astype(x.dtype)


def dtype_of(name: str):
  return jnp.dtype(name)
