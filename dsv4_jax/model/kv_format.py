"""How KV-cache entries are stored (spec §8.1): packing to and from the cache's storage form, pure `jnp`.

kv_format "fp8" (the production layout), one uint8 row per entry:
  attention entry (K=V, head_dim c, rope dims r): [fp8 e4m3 NoPE (c - r) | bf16 RoPE (2r bytes) |
    one ue8m0 scale per 64 NoPE values | 1 pad byte]  = 448 + 128 + 7 + 1 = 584 bytes for c = 512;
  indexer key (c_i): [e2m1 codes, two a byte, low nibble = even dim (c_i / 2) | one ue8m0 scale per 32]
    = 64 + 4 = 68 bytes for c_i = 128.
"bf16" / "float32": the plain vector in that dtype (debugging; "float32" is lossless).

The FP8 / FP4 scales and roundings are those of the QAT simulation (`quant.fp8_e4m3_qdq`, `quant.fp4_e2m1_qdq`),
so an entry that went through the simulation is stored and read back exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.model import quant
from pallas_kernels.paged_index_scores import fp4

KV_FORMATS = ("fp8", "bf16", "float32")
FP8_BLOCK = 64  # NoPE values per ue8m0 scale
FP4_BLOCK = fp4.BLOCK  # indexer-key values per ue8m0 scale


def check_format(kv_format: str) -> None:
  if kv_format not in KV_FORMATS:
    raise ValueError(f"kv_format={kv_format!r}; expected one of {KV_FORMATS}")


def entry_width(cfg, kv_format: str) -> tuple[int, jnp.dtype]:
  """(row length, storage dtype) of one attention entry."""
  check_format(kv_format)
  if kv_format == "fp8":
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    return nope + 2 * cfg.qk_rope_head_dim + nope // FP8_BLOCK + 1, jnp.dtype(jnp.uint8)
  return cfg.head_dim, jnp.dtype(jnp.bfloat16 if kv_format == "bf16" else jnp.float32)


def key_width(cfg, kv_format: str) -> tuple[int, jnp.dtype]:
  """(row length, storage dtype) of one compressed indexer key."""
  check_format(kv_format)
  c = cfg.index_head_dim
  if kv_format == "fp8":
    return c // 2 + c // FP4_BLOCK, jnp.dtype(jnp.uint8)
  return c, jnp.dtype(jnp.bfloat16 if kv_format == "bf16" else jnp.float32)


def _ue8m0_byte(scale):
  """Biased exponent byte of an exact power-of-two float32 scale."""
  bits = jax.lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.int32)
  return ((bits >> 23) & 0xFF).astype(jnp.uint8)


def _block_scales(x_NB, max_value: float, floor: float):
  amax = jnp.maximum(jnp.max(jnp.abs(x_NB), axis=-1, keepdims=True), jnp.float32(floor))
  return quant._pow2_scale(amax, max_value)


def pack_entries(x, rope_dim: int, kv_format: str):
  """Attention entries [..., c] (any float dtype) -> storage rows."""
  check_format(kv_format)
  if kv_format != "fp8":
    return x.astype(jnp.bfloat16 if kv_format == "bf16" else jnp.float32)
  lead, c = x.shape[:-1], x.shape[-1]
  nope = c - rope_dim
  if nope % FP8_BLOCK:
    raise ValueError(f"fp8 entries need NoPE dims ({nope}) in blocks of {FP8_BLOCK}")
  x_NB = x[..., :nope].astype(jnp.float32).reshape(*lead, nope // FP8_BLOCK, FP8_BLOCK)
  scale_N1 = _block_scales(x_NB, quant.FP8_MAX, quant.FP8_AMAX_FLOOR)
  q_NB = quant._round_to_grid(jnp.clip(x_NB / scale_N1, -quant.FP8_MAX, quant.FP8_MAX), 3, -6)
  nope_bytes = jax.lax.bitcast_convert_type(q_NB.astype(jnp.float8_e4m3fn), jnp.uint8).reshape(*lead, nope)
  rope_bytes = jax.lax.bitcast_convert_type(x[..., nope:].astype(jnp.bfloat16), jnp.uint8).reshape(
      *lead, 2 * rope_dim)
  pad = jnp.zeros(lead + (1,), jnp.uint8)
  return jnp.concatenate([nope_bytes, rope_bytes, _ue8m0_byte(scale_N1[..., 0]), pad], axis=-1)


def unpack_entries(rows, head_dim: int, rope_dim: int, kv_format: str, dtype):
  """Storage rows -> attention entries [..., head_dim] in `dtype`.

  Elementwise on the bytes (slices, reshapes, converts, one concatenate), no gathers, so XLA can fuse the
  dequantization into whatever reads the entries.
  """
  if kv_format != "fp8":
    return rows.astype(dtype)
  lead = rows.shape[:-1]
  nope = head_dim - rope_dim
  n_scales = nope // FP8_BLOCK
  q = jax.lax.bitcast_convert_type(rows[..., :nope], jnp.float8_e4m3fn).astype(jnp.float32)
  scale = fp4.ue8m0_value(rows[..., nope + 2 * rope_dim:nope + 2 * rope_dim + n_scales])
  nope_vals = (q.reshape(*lead, n_scales, FP8_BLOCK) * scale[..., None]).reshape(*lead, nope)
  rope_pairs = rows[..., nope:nope + 2 * rope_dim].reshape(*lead, rope_dim, 2).astype(jnp.uint32)
  rope_vals = _bf16_bits_value(rope_pairs[..., 0] | (rope_pairs[..., 1] << 8))  # little-endian bf16
  return jnp.concatenate([nope_vals, rope_vals], axis=-1).astype(dtype)


def _bf16_bits_value(bits):
  """float32 value of bf16 bit patterns (uint32 holding 16 bits): the bf16 is the float32's top half."""
  return jax.lax.bitcast_convert_type(bits << 16, jnp.float32)


def _e2m1_code(q):
  """e2m1 code (sign bit 3) of a value already on the grid {0, .5, 1, 1.5, 2, 3, 4, 6} · ±1."""
  a = jnp.abs(q)
  mag = jnp.where(a < 2, 2 * a, jnp.where(a < 4, a + 2, a / 2 + 4)).astype(jnp.uint8)
  return mag | jnp.where(jnp.signbit(q), jnp.uint8(8), jnp.uint8(0))  # -0 keeps its sign, as a cast


def pack_keys(x, kv_format: str):
  """Indexer keys [..., c_i] -> storage rows (fp8 format: MXFP4, 1 x 32 blocks)."""
  check_format(kv_format)
  if kv_format != "fp8":
    return x.astype(jnp.bfloat16 if kv_format == "bf16" else jnp.float32)
  lead, c = x.shape[:-1], x.shape[-1]
  if c % FP4_BLOCK:
    raise ValueError(f"fp4 indexer keys need {c} dims in blocks of {FP4_BLOCK}")
  x_NB = x.astype(jnp.float32).reshape(*lead, c // FP4_BLOCK, FP4_BLOCK)
  scale_N1 = _block_scales(x_NB, quant.FP4_MAX, quant.FP4_AMAX_FLOOR)
  q_NB = quant._round_to_grid(jnp.clip(x_NB / scale_N1, -quant.FP4_MAX, quant.FP4_MAX), 1, 0)
  codes = _e2m1_code(q_NB).reshape(*lead, c // 2, 2)
  packed = codes[..., 0] | (codes[..., 1] << 4)
  return jnp.concatenate([packed, _ue8m0_byte(scale_N1[..., 0])], axis=-1)


def unpack_keys(rows, index_dim: int, kv_format: str, dtype):
  """Storage rows -> indexer keys [..., index_dim] in `dtype` (fp8 format: the MXFP4 rows that
  pallas_kernels.paged_index_scores reads; decoded by its fp4.unpack, elementwise on the bytes)."""
  if kv_format != "fp8":
    return rows.astype(dtype)
  return fp4.unpack(rows, index_dim, dtype)
