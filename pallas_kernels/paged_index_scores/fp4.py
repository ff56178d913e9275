"""The MXFP4 indexer-key row that the paged cache stores (spec §8.1), read back in pure `jnp`.

One uint8 row per key of d dims: [d/2 bytes of e2m1 codes, two a byte, low nibble = even dim | d/32 ue8m0
scales, one per 32 dims] (68 bytes at d = 128). Arithmetic on the bytes, no table gather, so XLA can fuse the
decoding into whatever reads the keys. The writer is dsv4_jax.model.kv_format.pack_keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 32  # dims per ue8m0 scale


def row_bytes(d: int) -> int:
  """Bytes of one packed key of d dims."""
  if d % BLOCK:
    raise ValueError(f"MXFP4 keys need dims in blocks of {BLOCK}; got d = {d}")
  return d // 2 + d // BLOCK


def ue8m0_value(byte):
  """float32 2^(byte - 127) of ue8m0 scale bytes (the float32 whose exponent field is the byte)."""
  return jax.lax.bitcast_convert_type(byte.astype(jnp.int32) << 23, jnp.float32)


def e2m1_value(code):
  """float32 value of e2m1 codes (uint8, 0..15): bit 3 sign, bits 1-2 exponent (bias 1), bit 0 mantissa.

  2|v| is an integer: m for exponent 0 (subnormal), (2 + m) << (e - 1) otherwise; code 8 is -0.0.
  """
  e, m = (code >> 1) & 3, code & 1
  twice = jnp.where(e == 0, m, (m + 2) << (jnp.maximum(e, 1) - 1))
  return twice.astype(jnp.float32) * jnp.where((code & 8) != 0, jnp.float32(-0.5), jnp.float32(0.5))


def unpack(rows, d: int, dtype):
  """Packed rows [..., row_bytes(d)] uint8 -> keys [..., d] in `dtype` (exact: every value is code · 2^k)."""
  if rows.shape[-1] != row_bytes(d):
    raise ValueError(f"packed MXFP4 keys of d = {d} are rows of {row_bytes(d)} bytes; got {rows.shape[-1]}")
  lead = rows.shape[:-1]
  half, n_scales = d // 2, d // BLOCK
  nibble_shift = jnp.array([0, 4], jnp.uint8)  # low nibble = even dim
  codes = ((rows[..., :half, None] >> nibble_shift) & 0x0F).reshape(*lead, n_scales, BLOCK)
  scale = ue8m0_value(rows[..., half:half + n_scales])
  return (e2m1_value(codes) * scale[..., None]).reshape(*lead, d).astype(dtype)
