"""Blockwise KV compression (DeepSeek-V4 spec §5): the definition of the op, in pure JAX.

Inputs are the projected rows of every token, kv and score (gate logits) [B, S, coff·c] (coff = 2 with the CSA
overlap, else 1), and a list of "slots" per batch row: slot n pools the m tokens ending at row end[n] (-1 = no
slot). Per channel, a softmax over the block's rows of score + ape[row offset] weighs the kv rows:

  no overlap (HCA, m = 128):  the block's m rows, all c channels;
  overlap (CSA, m = 4):       the block's m rows through channels [c:], and, where has_prev, the m rows before
                              them through channels [:c] (2m logits per channel; none: -inf / 0).

The pooled vector (float32) is cast to out_dtype, RMS-normed with a weight (float32 math, out_dtype result) and
RoPE'd on its last 2·len(freqs) dims at the slot's position (interleaved pairs, float32 math). Empty slots give
zeros. The FP8 cache layout (spec §8.1) of an entry: `pack_fp8`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_AMAX_FLOOR = 1e-4  # amax floor of the production act_quant
FP8_BLOCK = 64  # NoPE values per ue8m0 scale


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static description of one compression (hashable: a jit / custom_vjp static argument)."""
  ratio: int  # m: tokens per block
  overlap: bool  # CSA's 2m-row overlap (kv / score carry 2c channels)
  rope_freqs: tuple  # inverse frequencies (float) of the rope dims, the last 2·len(rope_freqs) of c
  eps: float  # RMSNorm epsilon
  out_dtype: str  # dtype of the entries

  @property
  def rope_dim(self) -> int:
    return 2 * len(self.rope_freqs)


def rope_tables(positions_BN, rope_freqs):
  """(cos, sin) [B, N, R/2] float32 at integer positions."""
  angles = positions_BN.astype(jnp.float32)[..., None] * jnp.asarray(rope_freqs, jnp.float32)
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x_BNC, cos, sin):
  """Interleaved-pair rotation of the last 2·R/2 dims (float32 math, x's dtype back)."""
  r = 2 * cos.shape[-1]
  nope, rope = x_BNC[..., :-r], x_BNC[..., -r:]
  pairs = rope.astype(jnp.float32).reshape(rope.shape[:-1] + (r // 2, 2))
  re, im = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(rope.shape)
  return jnp.concatenate([nope, rotated.astype(x_BNC.dtype)], axis=-1)


def rms_norm(x, weight, eps: float):
  """Weighted RMSNorm over the last axis: float32 math, x's dtype back."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(x.dtype)


def gather_rows(x_BSC, end_BN, m: int):
  """[B, N, m, C]: the m rows ending at end_BN (clipped into range; callers mask what is not real)."""
  rows_BNM = end_BN[:, :, None] - m + 1 + jnp.arange(m, dtype=jnp.int32)
  return jax.vmap(lambda a, i: a[i])(x_BSC, jnp.clip(rows_BNM, 0, x_BSC.shape[1] - 1))


def pool(kv_BSC, score_BSC, ape_MC, end_BN, has_prev_BN, spec: Spec):
  """The softmax-gated pooled vector of every slot [B, N, c] float32 (garbage where end < 0)."""
  m = spec.ratio
  f32 = lambda a: a.astype(jnp.float32)
  ape_MC = f32(ape_MC)
  cur_kv = f32(gather_rows(kv_BSC, end_BN, m))
  cur_score = f32(gather_rows(score_BSC, end_BN, m)) + ape_MC
  if not spec.overlap:
    kv_NRC, score_NRC = cur_kv, cur_score
  else:
    c = kv_BSC.shape[-1] // 2
    has_prev = has_prev_BN[:, :, None, None]
    prev_kv = jnp.where(has_prev, f32(gather_rows(kv_BSC, end_BN - m, m))[..., :c], 0.0)
    prev_score = jnp.where(has_prev, f32(gather_rows(score_BSC, end_BN - m, m))[..., :c] + ape_MC[:, :c],
                           -jnp.inf)
    kv_NRC = jnp.concatenate([prev_kv, cur_kv[..., c:]], axis=-2)
    score_NRC = jnp.concatenate([prev_score, cur_score[..., c:]], axis=-2)
  return jnp.sum(kv_NRC * jax.nn.softmax(score_NRC, axis=-2), axis=-2)


def compress_reference(kv_BSC, score_BSC, ape_MC, weight_C, end_BN, has_prev_BN, positions_BN, spec: Spec):
  """Entries [B, N, c] in spec.out_dtype: pool, cast, RMSNorm, RoPE at positions_BN; zeros where end < 0."""
  pooled_BNC = pool(kv_BSC, score_BSC, ape_MC, end_BN, has_prev_BN, spec)
  entry_BNC = rms_norm(pooled_BNC.astype(spec.out_dtype), weight_C, spec.eps)
  entry_BNC = rotate(entry_BNC, *rope_tables(positions_BN, spec.rope_freqs))
  return jnp.where((end_BN >= 0)[..., None], entry_BNC, jnp.zeros((), entry_BNC.dtype))


# ---------------------------------------------------------------------------------------------------------------
# FP8 cache layout (spec §8.1): [e4m3 NoPE (c - r) | bf16 RoPE (2r bytes) | ue8m0 scale per 64 NoPE | 1 pad].
def fp8_row_bytes(c: int, rope_dim: int) -> int:
  nope = c - rope_dim
  return nope + 2 * rope_dim + nope // FP8_BLOCK + 1


def pow2_scale(amax):
  """2**ceil(log2(amax · f32(1/448))) from the float32 exponent bits (amax a positive normal float32)."""
  bits = jax.lax.bitcast_convert_type(amax.astype(jnp.float32) * jnp.float32(1.0 / FP8_MAX), jnp.int32)
  log2_ceil = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
  return jax.lax.bitcast_convert_type((log2_ceil + 127) << 23, jnp.float32)


def _rne(x):
  return jax.lax.round(x, jax.lax.RoundingMethod.TO_NEAREST_EVEN)


def e4m3_code(v):
  """e4m3fn byte (int32 0..255) of float32 v rounded to nearest even onto the grid (|v| <= 448 assumed).

  Exact float32 arithmetic: the grid spacing is 2**(e - 3) for |v| in [2**e, 2**(e+1)), 2**-9 below 2**-6."""
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  sign = (bits >> 24) & 0x80
  exponent = jnp.maximum(((bits >> 23) & 0xFF) - 127, -6)
  ulp = jax.lax.bitcast_convert_type((exponent - 3 + 127) << 23, jnp.float32)
  q = jnp.abs(_rne(v / ulp) * ulp)  # on the grid; may carry into the next binade
  qbits = jax.lax.bitcast_convert_type(q, jnp.int32)
  q_exp = ((qbits >> 23) & 0xFF) - 127
  normal = ((q_exp + 7) << 3) | ((qbits >> 20) & 0x7)
  subnormal = _rne(q * 512.0).astype(jnp.int32)  # 0..7 (8 = 2**-6 is normal)
  return sign | jnp.where(q_exp >= -6, normal, subnormal)


def pack_fp8(entry_BNC, rope_dim: int):
  """Entries [..., c] -> uint8 rows [..., fp8_row_bytes(c, rope_dim)] of the FP8 cache layout."""
  lead, c = entry_BNC.shape[:-1], entry_BNC.shape[-1]
  nope = c - rope_dim
  if nope % FP8_BLOCK or nope <= 0:
    raise ValueError(f"fp8 entries need NoPE dims (c {c} - rope {rope_dim}) in positive multiples of {FP8_BLOCK}")
  x = entry_BNC[..., :nope].astype(jnp.float32).reshape(*lead, nope // FP8_BLOCK, FP8_BLOCK)
  scale = pow2_scale(jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), FP8_AMAX_FLOOR))
  codes = e4m3_code(jnp.clip(x / scale, -FP8_MAX, FP8_MAX)).astype(jnp.uint8).reshape(*lead, nope)
  rope = jax.lax.bitcast_convert_type(entry_BNC[..., nope:].astype(jnp.bfloat16), jnp.uint8)
  scale_bytes = ((jax.lax.bitcast_convert_type(scale[..., 0], jnp.int32) >> 23) & 0xFF).astype(jnp.uint8)
  return jnp.concatenate([codes, rope.reshape(*lead, 2 * rope_dim), scale_bytes,
                          jnp.zeros(lead + (1,), jnp.uint8)], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
def block_slots(positions_BS, segment_BS, ratio: int):
  """Slots of the blocks whose m tokens all lie in this sequence and one document (packed documents restart
  blocks at every document start): (end [B, N] int32 (-1 = none), has_prev [B, N] bool, rope positions [B, N]
  int32 = block index · m), N = S // m, slots in sequence order. A token's block is position // m."""
  B, S = positions_BS.shape
  n = S // ratio
  t_S = jnp.arange(S, dtype=jnp.int32)

  def same_doc_back(steps):
    back_S = t_S - steps
    seg = jnp.take_along_axis(segment_BS, jnp.broadcast_to(jnp.maximum(back_S, 0), (B, S)), axis=1)
    return (back_S >= 0)[None] & (seg == segment_BS)

  is_end_BS = (positions_BS % ratio == ratio - 1) & same_doc_back(ratio - 1)
  end_BN = jax.vmap(lambda e: jnp.nonzero(e, size=n, fill_value=-1)[0])(is_end_BS).astype(jnp.int32)
  safe_BN = jnp.maximum(end_BN, 0)
  pos_BN = jnp.take_along_axis(positions_BS, safe_BN, axis=1) // ratio * ratio
  has_prev_BN = (jnp.take_along_axis(same_doc_back(2 * ratio - 1), safe_BN, axis=1) & (pos_BN >= ratio)
                 & (end_BN >= 0))
  return end_BN, has_prev_BN, jnp.where(end_BN >= 0, pos_BN, 0).astype(jnp.int32)
