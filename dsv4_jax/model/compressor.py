"""Token-level compressor (spec §5): softmax-gated pooling of m tokens into one KV entry, in float32.

CSA (m = 4) overlaps: entry i pools 2m rows, the current block's tokens through the second half of the
projected channels and the previous block's tokens through the first half. HCA (m = 128) pools its block only.
The pooled entry is RMS-normed, RoPE'd at the block's first position (i·m) (these three steps are the
`pallas_kernels.compress` op, implementation cfg.attention_impl), then QAT-rounded: FP8 on the NoPE
dims for attention entries, Hadamard + FP4 on the whole vector for indexer keys. `__call__` compresses a whole
sequence; `extend` continues from a cached tail (decode and chunked prefill), with the same arithmetic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from dsv4_jax.model import kernel_sharding, quant, rope
from dsv4_jax.model.common import RMSNorm, param
from dsv4_jax.model.context import BlockLayout


class Compressor(nnx.Module):

  def __init__(self, cfg, ratio: int, head_dim: int, *, for_indexer: bool, rngs: nnx.Rngs):
    self.cfg, self.ratio, self.head_dim, self.for_indexer = cfg, ratio, head_dim, for_indexer
    self.overlap = ratio == 4
    width = (2 if self.overlap else 1) * head_dim
    d = cfg.hidden_size
    self.wkv = param(rngs, (d, width), ("embed", "compress"), jnp.dtype(cfg.param_dtype))
    self.wgate = param(rngs, (d, width), ("embed", "compress"), jnp.dtype(cfg.param_dtype))
    self.ape = param(rngs, (ratio, width), (None, "compress"), jnp.float32, std=0.5)
    self.norm = RMSNorm(head_dim, cfg.rms_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)

  def __call__(self, x_BSD, positions_BS, layout: BlockLayout):
    """Compressed entries [B, N, head_dim] (in the activation dtype) for the slots of `layout` (zeros in
    unused slots). Pooling, norm and RoPE are one `pallas_kernels.compress` op (implementation: cfg.attention_impl)."""
    cfg, m = self.cfg, self.ratio
    if not isinstance(self.norm, RMSNorm):  # a test swapped the norm out to see the pooled vector: unfused path
      return self._unfused(x_BSD, positions_BS, layout)
    kv_BSC, score_BSC = self.project_raw(x_BSD)
    impl = "auto" if cfg.attention_impl == "gpu" else cfg.attention_impl  # auto: the GPU kernel on GPU
    kernel = functools.partial(pallas_kernels.compress, ratio=m, eps=cfg.rms_norm_eps, out_dtype=x_BSD.dtype,
                               rope_freqs=rope.layer_frequencies(cfg, compressed=True), implementation=impl)
    entry_BNC = kernel_sharding.per_shard(
        "compress", kernel, (kv_BSC, score_BSC, self.ape[...], self.norm.weight[...],
                             jnp.where(layout.valid_BN, layout.end_BN, -1), layout.has_prev_BN, layout.block_BN * m),
        ("BSC", "BSC", "RC", "C", "BN", "BN", "BN"), "BNC", implementation=impl)
    return self.quantize(entry_BNC)

  def _unfused(self, x_BSD, positions_BS, layout: BlockLayout):
    m, c = self.ratio, self.head_dim
    kv_BSC, score_BSC = self.project(x_BSD, positions_BS)
    gather = jax.vmap(lambda a, i: a[i])  # per batch row: [S, C] x [N, m] -> [N, m, C]
    rows_NM = layout.end_BN[:, :, None] - m + 1 + jnp.arange(m, dtype=jnp.int32)
    cur_kv = gather(kv_BSC, jnp.maximum(rows_NM, 0))
    cur_score = gather(score_BSC, jnp.maximum(rows_NM, 0))
    prev_kv = prev_score = None
    if self.overlap:
      prev_rows = jnp.maximum(rows_NM - m, 0)
      has_prev = layout.has_prev_BN[:, :, None, None]
      prev_kv = jnp.where(has_prev, gather(kv_BSC, prev_rows)[..., :c], 0.0)
      prev_score = jnp.where(has_prev, gather(score_BSC, prev_rows)[..., :c], -jnp.inf)
    pooled_BNC = self.pool(cur_kv, cur_score, prev_kv, prev_score)
    return self.finish(pooled_BNC, layout.block_BN, x_BSD.dtype)

  def project_raw(self, x_BSD):
    """(kv, gate logits) [B, S, coff·head_dim] float32 of every token, before the position bias `ape`."""
    cfg = self.cfg
    dt = jnp.float32 if cfg.fp32_matmuls else x_BSD.dtype
    x_in = x_BSD.astype(dt)
    kv_BSC = jnp.einsum("BSD,DC->BSC", x_in, self.wkv[...].astype(dt), precision="highest",
                        preferred_element_type=jnp.float32)
    score_BSC = jnp.einsum("BSD,DC->BSC", x_in, self.wgate[...].astype(dt), precision="highest",
                           preferred_element_type=jnp.float32)
    return kv_BSC, score_BSC

  def project(self, x_BSD, positions_BS):
    """(kv, gate score + ape) [B, S, coff·head_dim] float32 of every token."""
    kv_BSC, score_BSC = self.project_raw(x_BSD)
    return kv_BSC, score_BSC + self.ape[...][positions_BS % self.ratio]

  def pool(self, cur_kv, cur_score, prev_kv=None, prev_score=None):
    """Softmax-gated sum over a block's rows [..., m, coff·c] -> [..., c]. CSA: the block's second channel
    half plus the previous block's first half (`prev_*` [..., m, c]: 0 / -inf where there is none)."""
    c = self.head_dim
    if self.overlap:
      kv_NRC = jnp.concatenate([prev_kv, cur_kv[..., c:]], axis=-2)
      score_NRC = jnp.concatenate([prev_score, cur_score[..., c:]], axis=-2)
    else:
      kv_NRC, score_NRC = cur_kv, cur_score
    return jnp.sum(kv_NRC * jax.nn.softmax(score_NRC, axis=-2), axis=-2)

  def finish(self, pooled_BNC, block_BN, dtype):
    """RMSNorm, RoPE at the block's first position (block · m), QAT rounding: the stored entry (the unfused
    path of decode's `extend`; the same arithmetic as the `compress` op)."""
    entry_BNC = self.norm(pooled_BNC.astype(dtype))
    table = rope.rope_table(block_BN * self.ratio, rope.layer_frequencies(self.cfg, compressed=True))
    return self.quantize(rope.rotate(entry_BNC, table))

  def quantize(self, entry_BNC):
    """QAT rounding of finished entries: FP8 NoPE dims (attention), Hadamard + FP4 (indexer keys)."""
    cfg = self.cfg
    if not cfg.simulate_quant:
      return entry_BNC
    if self.for_indexer:
      return quant.fp4_e2m1_qdq(quant.hadamard(entry_BNC), 32)
    return quant_kv(entry_BNC, cfg)

  def extend(self, x_BSD, kv_state, score_state, start_B, count_B):
    """Incremental compression (decode, chunked prefill) from the tail state of the official `kv_state` /
    `score_state` layout [B, coff·m, coff·c] (row e = position (start // m - coff + 1)·m + e).

    Tokens s < count_B of the chunk x_BSD sit at positions start_B + s. Returns (entries [B, N, c] of the
    blocks the chunk finishes, their block indices [B, N], valid [B, N], new kv_state, new score_state),
    N = ceil(S / m) candidate blocks. Same pooling and rounding as __call__, so the entries are identical.
    """
    m, c = self.ratio, self.head_dim
    coff = 2 if self.overlap else 1
    B, S = x_BSD.shape[:2]
    kv_BSC, score_BSC = self.project(x_BSD, start_B[:, None] + jnp.arange(S, dtype=jnp.int32))
    n_new = -(-S // m)
    n_ext = n_new + coff  # block-aligned rows from the tail's first block on
    first_B = (start_B // m - (coff - 1)) * m
    e_E = jnp.arange(n_ext * m, dtype=jnp.int32)
    pos_BE = first_B[:, None] + e_E
    from_state_BE = pos_BE < start_B[:, None]
    src_BE = jnp.where(from_state_BE, jnp.minimum(e_E, coff * m - 1),
                       coff * m + jnp.clip(pos_BE - start_B[:, None], 0, S - 1))
    take = lambda a_BRC: jnp.take_along_axis(a_BRC, src_BE[:, :, None], axis=1)
    ext_kv = jnp.where((pos_BE >= 0)[..., None], take(jnp.concatenate([kv_state, kv_BSC], axis=1)), 0.0)
    ext_score = jnp.where((pos_BE >= 0)[..., None],
                          take(jnp.concatenate([score_state, score_BSC], axis=1)), -jnp.inf)
    ext_kv = ext_kv.reshape(B, n_ext, m, coff * c)
    ext_score = ext_score.reshape(B, n_ext, m, coff * c)

    cur = slice(coff - 1, coff - 1 + n_new)
    prev_kv = ext_kv[:, :n_new, :, :c] if self.overlap else None
    prev_score = ext_score[:, :n_new, :, :c] if self.overlap else None
    pooled_BNC = self.pool(ext_kv[:, cur], ext_score[:, cur], prev_kv, prev_score)
    block_BN = start_B[:, None] // m + jnp.arange(n_new, dtype=jnp.int32)
    valid_BN = (block_BN + 1) * m <= (start_B + count_B)[:, None]
    entries_BNC = self.finish(pooled_BNC, block_BN, x_BSD.dtype)

    end_B = start_B + count_B
    shift_B = end_B // m - start_B // m  # blocks finished: the tail moves on by as many
    keep_B1 = (shift_B[:, None] + jnp.arange(coff, dtype=jnp.int32))[:, :, None, None]
    new_kv = jnp.take_along_axis(ext_kv, keep_B1, axis=1).reshape(kv_state.shape)
    new_score = jnp.take_along_axis(ext_score, keep_B1, axis=1).reshape(score_state.shape)
    new_pos_BE = (end_B // m - (coff - 1))[:, None] * m + e_E[:coff * m]
    held_BE1 = ((new_pos_BE >= 0) & (new_pos_BE < end_B[:, None]))[..., None]  # rows past the end stay empty
    return (entries_BNC, block_BN, valid_BN, jnp.where(held_BE1, new_kv, 0.0),
            jnp.where(held_BE1, new_score, -jnp.inf))


def quant_kv(kv, cfg):
  """FP8 e4m3 round trip of the NoPE dims (64-wide blocks); the RoPE dims stay in the activation dtype."""
  r = cfg.qk_rope_head_dim
  return jnp.concatenate([quant.fp8_e4m3_qdq(kv[..., :-r], 64), kv[..., -r:]], axis=-1)
