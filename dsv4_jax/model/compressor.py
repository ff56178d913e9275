"""Token-level compressor (spec §5): softmax-gated pooling of m tokens into one KV entry, in float32.

CSA (m = 4) overlaps: entry i pools 2m rows, the current block's tokens through the second half of the
projected channels and the previous block's tokens through the first half. HCA (m = 128) pools its block only.
The pooled entry is RMS-normed, RoPE'd at the block's first position (i·m), then QAT-rounded: FP8 on the NoPE
dims for attention entries, Hadamard + FP4 on the whole vector for indexer keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.model import quant, rope
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
    """Compressed entries [B, N, head_dim] (in the activation dtype) for the slots of `layout`."""
    cfg, m, c = self.cfg, self.ratio, self.head_dim
    dt = jnp.float32 if cfg.fp32_matmuls else x_BSD.dtype
    x_in = x_BSD.astype(dt)
    kv_BSC = jnp.einsum("BSD,DC->BSC", x_in, self.wkv[...].astype(dt), precision="highest",
                        preferred_element_type=jnp.float32)
    score_BSC = jnp.einsum("BSD,DC->BSC", x_in, self.wgate[...].astype(dt), precision="highest",
                           preferred_element_type=jnp.float32)
    score_BSC = score_BSC + self.ape[...][positions_BS % m]

    gather = jax.vmap(lambda a, i: a[i])  # per batch row: [S, C] x [N, m] -> [N, m, C]
    rows_NM = layout.end_BN[:, :, None] - m + 1 + jnp.arange(m, dtype=jnp.int32)
    cur_kv = gather(kv_BSC, jnp.maximum(rows_NM, 0))
    cur_score = gather(score_BSC, jnp.maximum(rows_NM, 0))
    if self.overlap:
      prev_rows = jnp.maximum(rows_NM - m, 0)
      has_prev = layout.has_prev_BN[:, :, None, None]
      prev_kv = jnp.where(has_prev, gather(kv_BSC, prev_rows)[..., :c], 0.0)
      prev_score = jnp.where(has_prev, gather(score_BSC, prev_rows)[..., :c], -jnp.inf)
      kv_BNRC = jnp.concatenate([prev_kv, cur_kv[..., c:]], axis=2)
      score_BNRC = jnp.concatenate([prev_score, cur_score[..., c:]], axis=2)
    else:
      kv_BNRC, score_BNRC = cur_kv, cur_score
    pooled_BNC = jnp.sum(kv_BNRC * jax.nn.softmax(score_BNRC, axis=2), axis=2)

    entry_BNC = self.norm(pooled_BNC.astype(x_BSD.dtype))
    table = rope.rope_table(layout.block_BN * m, rope.layer_frequencies(cfg, compressed=True))
    entry_BNC = rope.rotate(entry_BNC, table)
    if cfg.simulate_quant:
      if self.for_indexer:
        entry_BNC = quant.fp4_e2m1_qdq(quant.hadamard(entry_BNC), 32)
      else:
        entry_BNC = quant_kv(entry_BNC, cfg)
    return entry_BNC


def quant_kv(kv, cfg):
  """FP8 e4m3 round trip of the NoPE dims (64-wide blocks); the RoPE dims stay in the activation dtype."""
  r = cfg.qk_rope_head_dim
  return jnp.concatenate([quant.fp8_e4m3_qdq(kv[..., :-r], 64), kv[..., -r:]], axis=-1)
