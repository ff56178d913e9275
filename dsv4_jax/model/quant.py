"""FP8 (e4m3) / FP4 (e2m1) block quantization: QAT simulation for the forward pass, checkpoint formats.

Two halves (spec §9, §20):

* QAT simulation, pure `jnp`, jit-able, any leading shape, blocks along the last axis:
  `fp8_e4m3_qdq`, `fp4_e2m1_qdq` (quantize then dequantize, straight-through gradient) and `hadamard`.
  They reproduce the production tilelang kernels `act_quant_kernel(..., round_scale=True, inplace=True)` and
  `fp4_quant_kernel(..., inplace=True)` bit for bit:

    amax  = max(max|x_block|, floor)          floor 1e-4 (FP8) or 6 * 2**-126 (FP4)
    scale = 2 ** ceil(log2(amax * f32(1/max)))  exponent bits of the f32 product (`fast_round_scale`)
    y     = f32(cast_rne(clip(x / scale, -max, max))) * scale, cast back to x's dtype

  The RNE cast is written as exact float32 arithmetic (`_round_to_grid`), not as a convert pair: XLA:GPU
  compiles f32 -> float8_e4m3fn -> f32 to a plain copy (seen on an H200, jax 0.11.2), so the simulation would
  silently do nothing there. Tests check it bit for bit against ml_dtypes casts.

  The kernels multiply amax by the float32 reciprocal of 448 / 6 (not a division) and divide x by the scale
  (not a multiply by 1/scale; identical for a power of two). For every normal float32 amax the product's
  ceil-log2 equals the exact ceil(log2(amax / max)) (the tests sweep every mantissa of the edge binades).
  Float32 subnormals are backend dependent: XLA:CPU flushes them to zero, which only FP4 blocks with
  amax < 6 * 2**-126 can notice.

* Checkpoint formats, `numpy` on the host (weight loader, test checkpoint writer):
  FP8 weights `float8_e4m3fn [out, in]` with ue8m0 scales `[ceil(out/128), ceil(in/128)]`; FP4 experts as
  int8 `[out, in // 2]` holding two e2m1 codes per byte (low nibble = even column) with ue8m0 scales
  `[out, in // 32]`. ue8m0 scales arrive as raw exponent bytes, `float8_e8m0fnu` or float32 values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest float4_e2m1fn
FP8_AMAX_FLOOR = 1e-4  # act_quant_kernel: amax = max(amax, 1e-4)
FP4_AMAX_FLOOR = 6.0 * 2.0**-126  # fp4_quant_kernel: amax = max(amax, 6 * 2**-126)
FP8_WEIGHT_BLOCK = 128  # 128 x 128 weight blocks
FP4_WEIGHT_BLOCK = 32  # 1 x 32 expert weight blocks

# e2m1 code -> value; bit 3 is the sign, so code 8 is -0.0 (the official LUT in convert.py writes +0.0 there).
FP4_E2M1_VALUES = np.array(
  [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)

_F32_MANTISSA_MASK = (1 << 23) - 1


# ---------------------------------------------------------------------------------------------------------------
# QAT simulation (jnp).


def _pow2_scale(amax, max_value: float):
  """2**ceil(log2(amax * f32(1/max_value))) from the float32 exponent bits, exact (`fast_round_scale`).

  amax must be a positive normal float32 (the floors guarantee it); the result is then an exact power of two.
  """
  v = amax.astype(jnp.float32) * jnp.float32(1.0 / max_value)
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  exponent = (bits >> 23) & 0xFF
  log2_ceil = exponent - 127 + ((bits & _F32_MANTISSA_MASK) != 0).astype(jnp.int32)
  return jax.lax.bitcast_convert_type((log2_ceil + 127) << 23, jnp.float32)


def _round_to_grid(v, mantissa_bits: int, min_exponent: int):
  """Round float32 v to the nearest value with `mantissa_bits` fraction bits, ties to even; below
  2**min_exponent the spacing stays 2**(min_exponent - mantissa_bits) (the target's subnormals).

  Same values as the cast f32 -> float8_e4m3fn / float4_e2m1fn -> f32 for |v| <= the format max, but written
  as exact float32 arithmetic: XLA:GPU simplifies a convert pair f32 -> f8 -> f32 away (excess precision),
  which would silently switch the simulation off.
  """
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  exponent = jnp.maximum(((bits >> 23) & 0xFF) - 127, min_exponent)  # floor(log2|v|), clamped
  ulp = jax.lax.bitcast_convert_type((exponent - mantissa_bits + 127) << 23, jnp.float32)
  return jnp.round(v / ulp) * ulp  # v / ulp is exact and < 2**(mantissa_bits + 1); round is half-to-even


def _blocked_qdq(x, block: int, max_value: float, amax_floor: float, mantissa_bits: int, min_exponent: int):
  """Quantize-dequantize `x` in blocks of `block` along the last axis; float32 inside, x's dtype out."""
  n = x.shape[-1]
  if block <= 0 or n % block:
    raise ValueError(f"last dim {n} is not a multiple of block {block}")
  x_NB = x.astype(jnp.float32).reshape(*x.shape[:-1], n // block, block)
  amax_N1 = jnp.maximum(jnp.max(jnp.abs(x_NB), axis=-1, keepdims=True), jnp.float32(amax_floor))
  scale_N1 = _pow2_scale(amax_N1, max_value)
  q_NB = _round_to_grid(jnp.clip(x_NB / scale_N1, -max_value, max_value), mantissa_bits, min_exponent)
  return (q_NB * scale_N1).reshape(x.shape).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fp8_e4m3_qdq(x, block: int):
  """FP8 e4m3 quantize-dequantize per `block` values of the last axis (production `act_quant`, ue8m0, inplace).

  Power-of-two scale from amax (floored at 1e-4), round-to-nearest-even onto the e4m3 grid, output in x's
  dtype. Gradient: straight-through (identity), as in QAT.
  """
  return _blocked_qdq(x, block, FP8_MAX, FP8_AMAX_FLOOR, mantissa_bits=3, min_exponent=-6)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fp4_e2m1_qdq(x, block: int = 32):
  """FP4 e2m1 quantize-dequantize per `block` values of the last axis (production `fp4_act_quant`, inplace).

  Power-of-two scale from amax (floored at 6 * 2**-126), round-to-nearest-even onto {0, .5, 1, 1.5, 2, 3, 4, 6},
  output in x's dtype. Gradient: straight-through (identity).
  """
  return _blocked_qdq(x, block, FP4_MAX, FP4_AMAX_FLOOR, mantissa_bits=1, min_exponent=0)


@fp8_e4m3_qdq.defjvp
def _fp8_e4m3_qdq_jvp(block, primals, tangents):
  """Straight-through: the tangent passes unchanged (QAT hands the gradient straight to the master)."""
  return fp8_e4m3_qdq(primals[0], block), tangents[0]


@fp4_e2m1_qdq.defjvp
def _fp4_e2m1_qdq_jvp(block, primals, tangents):
  """Straight-through, as `fp8_e4m3_qdq`."""
  return fp4_e2m1_qdq(primals[0], block), tangents[0]


def hadamard(x):
  """Normalized Walsh-Hadamard transform on the last axis (length a power of two), Sylvester ordering.

  Equals x @ H_n * n**-0.5 with H_2n = [[H_n, H_n], [H_n, -H_n]], as the official `rotate_activation`
  (fast_hadamard_transform: float32 butterflies, scale, one cast back). log2(n) butterfly stages in float32.
  """
  n = x.shape[-1]
  if n < 1 or n & (n - 1):
    raise ValueError(f"hadamard needs a power-of-two last dim, got {n}")
  lead = x.shape[:-1]
  y = x.astype(jnp.float32)
  half = 1
  while half < n:  # butterfly on bit log2(half) of the index: (a, b) -> (a + b, a - b)
    y_G2H = y.reshape(*lead, n // (2 * half), 2, half)
    a, b = y_G2H[..., 0, :], y_G2H[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    half *= 2
  return (y.reshape(x.shape) * jnp.float32(n**-0.5)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint formats (numpy, host side).


def ue8m0_to_float32(scale) -> np.ndarray:
  """ue8m0 scales as float32: raw uint8 exponent bytes or float8_e8m0fnu (value 2**(b - 127)), or float values."""
  scale = np.asarray(scale)
  if scale.dtype == np.uint8 or scale.dtype == ml_dtypes.float8_e8m0fnu:
    b = scale.view(np.uint8)
    if np.any(b == 0xFF):
      raise ValueError("ue8m0 byte 0xFF is NaN")
    return np.ldexp(np.float32(1.0), b.astype(np.int32) - 127).astype(np.float32)
  if np.issubdtype(scale.dtype, np.floating) or scale.dtype == ml_dtypes.bfloat16:
    return scale.astype(np.float32)
  raise TypeError(f"unsupported ue8m0 scale dtype {scale.dtype}")


def float32_to_ue8m0(values) -> np.ndarray:
  """Exact powers of two 2**e (-127 <= e <= 127) to ue8m0 exponent bytes e + 127 (uint8)."""
  values = np.asarray(values)
  if values.dtype not in (np.float16, np.float32, np.float64):
    values = values.astype(np.float64)  # ints, bfloat16, float8_*: exact in float64
  mantissa, exponent = np.frexp(values)  # values = mantissa * 2**exponent, mantissa in [0.5, 1)
  if not np.all(np.isfinite(values) & (mantissa == 0.5)):
    raise ValueError("ue8m0 scales must be positive finite powers of two")
  biased = exponent.astype(np.int32) - 1 + 127
  if np.any((biased < 0) | (biased > 254)):
    raise ValueError("ue8m0 exponent out of range [-127, 127]")
  return biased.astype(np.uint8)


def _pow2_scale_np(amax, max_value: float) -> np.ndarray:
  """Host twin of `_pow2_scale`: 2**ceil(log2(amax * f32(1/max_value))) by float32 exponent bits."""
  v = np.asarray(amax, np.float32) * np.float32(1.0 / max_value)
  bits = v.view(np.int32)
  log2_ceil = ((bits >> 23) & 0xFF) - 127 + ((bits & _F32_MANTISSA_MASK) != 0)
  return ((log2_ceil + 127).astype(np.int32) << 23).view(np.float32)


def _as_e4m3(weight) -> np.ndarray:
  weight = np.asarray(weight)
  if weight.dtype in (np.uint8, np.int8):  # raw bytes, e.g. straight from a safetensors buffer
    return weight.view(ml_dtypes.float8_e4m3fn)
  if weight.dtype != ml_dtypes.float8_e4m3fn:
    raise TypeError(f"expected float8_e4m3fn (or its raw bytes), got {weight.dtype}")
  return weight


def dequant_fp8_blocks(weight, scale, block: int = FP8_WEIGHT_BLOCK) -> np.ndarray:
  """FP8 weight `[..., out, in]` times its ue8m0 block scale `[..., ceil(out/block), ceil(in/block)]`, float32."""
  w_OI = _as_e4m3(weight).astype(np.float32)
  s_oi = ue8m0_to_float32(scale)
  rows, cols = w_OI.shape[-2:]
  expected = (*w_OI.shape[:-2], -(-rows // block), -(-cols // block))
  if s_oi.shape != expected:
    raise ValueError(f"scale shape {s_oi.shape} does not match weight {w_OI.shape} (expected {expected})")
  s_OI = np.repeat(np.repeat(s_oi, block, axis=-2), block, axis=-1)[..., :rows, :cols]
  return w_OI * s_OI


def quant_fp8_blocks(w, block: int = FP8_WEIGHT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """float32 `[..., out, in]` -> (float8_e4m3fn weight, float8_e8m0fnu scale `[..., ceil(out/b), ceil(in/b)]`).

  Per block x block tile: scale = 2**ceil(log2(amax / 448)) (amax floored at 1e-4 as `act_quant`), then
  round-to-nearest-even of w / scale onto e4m3. Partial edge tiles are allowed.
  """
  w_OI = np.asarray(w, np.float32)
  *lead, rows, cols = w_OI.shape
  nr, nc = -(-rows // block), -(-cols // block)
  padded = np.zeros((*lead, nr * block, nc * block), np.float32)  # zero padding leaves every amax unchanged
  padded[..., :rows, :cols] = w_OI
  tiles = padded.reshape(*lead, nr, block, nc, block)
  amax_oi = np.maximum(np.abs(tiles).max(axis=(-3, -1)), np.float32(FP8_AMAX_FLOOR))
  s_oi = _pow2_scale_np(amax_oi, FP8_MAX)
  q = np.clip(tiles / s_oi[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
  q_OI = q.reshape(padded.shape)[..., :rows, :cols]
  return np.ascontiguousarray(q_OI), float32_to_ue8m0(s_oi).view(ml_dtypes.float8_e8m0fnu)


def dequant_fp4_packed(packed, scale, block: int = FP4_WEIGHT_BLOCK) -> np.ndarray:
  """Packed FP4 `[..., out, in // 2]` (int8/uint8, low nibble = even column) with ue8m0 scale
  `[..., out, in // block]` -> float32 `[..., out, in]`, via the 16-entry e2m1 table."""
  packed = np.asarray(packed)
  if packed.dtype not in (np.int8, np.uint8):
    raise TypeError(f"expected int8/uint8 packed e2m1 pairs, got {packed.dtype}")
  b = packed.view(np.uint8)
  codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
  w_OI = FP4_E2M1_VALUES[codes]
  s_OK = ue8m0_to_float32(scale)
  if s_OK.shape != (*w_OI.shape[:-1], w_OI.shape[-1] // block) or w_OI.shape[-1] % block:
    raise ValueError(f"scale shape {s_OK.shape} does not match weight {w_OI.shape} with block {block}")
  return w_OI * np.repeat(s_OK, block, axis=-1)


def quant_fp4_packed(w, block: int = FP4_WEIGHT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """float32 `[..., out, in]` -> (int8 `[..., out, in // 2]` e2m1 pairs, float8_e8m0fnu scale `[..., out, in // block]`).

  Per 1 x block: scale = 2**ceil(log2(amax / 6)) (amax floored at 6 * 2**-126 as `fp4_act_quant`), RNE onto
  e2m1; the even column goes to the low nibble.
  """
  w_OI = np.asarray(w, np.float32)
  cols = w_OI.shape[-1]
  if cols % block or block % 2:
    raise ValueError(f"in dim {cols} must be a multiple of block {block} (even)")
  w_OKB = w_OI.reshape(*w_OI.shape[:-1], cols // block, block)
  amax_OK = np.maximum(np.abs(w_OKB).max(axis=-1), np.float32(FP4_AMAX_FLOOR))
  s_OK = _pow2_scale_np(amax_OK, FP4_MAX)
  q_OKB = np.clip(w_OKB / s_OK[..., None], -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn)
  codes = (q_OKB.view(np.uint8) & 0x0F).reshape(*w_OI.shape[:-1], cols // 2, 2)
  packed = (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8).view(np.int8)
  return packed, float32_to_ue8m0(s_OK).view(ml_dtypes.float8_e8m0fnu)
