"""Lightning indexer (spec §6): picks the top-k compressed entries per query in CSA layers.

I[t, s] = Σ_h w[t, h] · relu(q[t, h] · k[s]) over the entries visible to t; queries are scored in chunks so
the [S, S/m] score matrix is never materialised whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.model import quant, rope
from dsv4_jax.model.common import param
from dsv4_jax.model.compressor import Compressor

_SCORE_BUDGET = 1 << 24  # elements of one chunk's [C, H, N] relu(q·k) tensor


class Indexer(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    h, c = cfg.index_n_heads, cfg.index_head_dim
    self.wq_b = param(rngs, (cfg.q_lora_rank, h, c), ("q_lora", "index_heads", "index_head_dim"), pdt)
    self.weights_proj = param(rngs, (cfg.hidden_size, h), ("embed", "index_heads"), pdt)
    self.compressor = Compressor(cfg, 4, c, for_indexer=True, rngs=rngs)

  def queries(self, qr_BSQ, ctx):
    cfg = self.cfg
    q_BSHC = jnp.einsum("BSQ,QHC->BSHC", qr_BSQ, self.wq_b[...].astype(qr_BSQ.dtype))
    q_BSHC = rope.rotate(q_BSHC, ctx.rope_yarn)
    if cfg.simulate_quant:
      q_BSHC = quant.fp4_e2m1_qdq(quant.hadamard(q_BSHC), 32)
    return q_BSHC

  def head_weights(self, x_BSD):
    """Per-head score weights w [B, S, H], scaled by (index_head_dim · index_n_heads)^-1/2."""
    cfg = self.cfg
    scale = cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5
    return jnp.einsum("BSD,DH->BSH", x_BSD, self.weights_proj[...].astype(x_BSD.dtype)) * scale

  def __call__(self, x_BSD, qr_BSQ, ctx, offset: int):
    """Top-k entry indices [B, S, k] (+offset; -1 where fewer than k entries are visible)."""
    return self.select(x_BSD, qr_BSQ, ctx, offset)[0]

  def select(self, x_BSD, qr_BSQ, ctx, offset: int, topk: int | None = None):
    """(indices [B, S, k] as in __call__, their index scores [B, S, k] float32, -inf where index is -1).

    `topk` overrides cfg.index_topk (the dense stage takes every entry); with
    `ctx.opts.detach_indexer_input` the indexer's inputs are stop-gradient (sparse-stage indexer training).
    """
    cfg = self.cfg
    if ctx.opts.detach_indexer_input:
      x_BSD, qr_BSQ = jax.lax.stop_gradient(x_BSD), jax.lax.stop_gradient(qr_BSQ)
    layout = ctx.layouts[4]
    q_BSHC = self.queries(qr_BSQ, ctx)
    k_BNC = self.compressor(x_BSD, ctx.positions_BS, layout)
    w_BSH = self.head_weights(x_BSD)
    k = min(cfg.index_topk if topk is None else topk, k_BNC.shape[1])
    return select_topk_with_scores(q_BSHC, k_BNC, w_BSH, layout, ctx.segment_BS, k, offset)


def index_scores(q_BCHK, k_BNK, w_BCH):
  logits_BCHN = jnp.einsum("BCHK,BNK->BCHN", q_BCHK, k_BNK.astype(q_BCHK.dtype),
                           preferred_element_type=jnp.float32, precision="highest")
  return jnp.einsum("BCHN,BCH->BCN", jax.nn.relu(logits_BCHN), w_BCH.astype(jnp.float32),
                    precision="highest")


def select_topk(q_BSHK, k_BNK, w_BSH, layout, segment_BS, topk: int, offset: int):
  """Top-k visible entry indices per query [B, S, topk] (+offset, -1 where fewer are visible)."""
  return select_topk_with_scores(q_BSHK, k_BNK, w_BSH, layout, segment_BS, topk, offset)[0]


def select_topk_with_scores(q_BSHK, k_BNK, w_BSH, layout, segment_BS, topk: int, offset: int):
  """(indices as select_topk, the selected entries' index scores [B, S, topk] float32, -inf where -1).

  The scores are differentiable in q, k and w; each chunk is rematerialised in the backward pass.
  """
  B, S, H, _ = q_BSHK.shape
  N = k_BNK.shape[1]
  if N == 0 or topk == 0:
    return jnp.full((B, S, 0), -1, jnp.int32), jnp.zeros((B, S, 0), jnp.float32)

  @jax.checkpoint
  def chunk(q, w, t_C, seg_BC):
    vis = layout.visible_BCN(t_C, seg_BC)
    scores = jnp.where(vis, index_scores(q, k_BNK, w), -jnp.inf)
    top, idx = jax.lax.top_k(scores, topk)
    chosen_visible = jnp.take_along_axis(vis, idx, axis=-1)
    return (jnp.where(chosen_visible, idx + offset, -1).astype(jnp.int32),
            jnp.where(chosen_visible, top, -jnp.inf))

  size = max(1, min(S, _SCORE_BUDGET // max(1, B * H * N)))
  t_S = jnp.arange(S, dtype=jnp.int32)
  if size >= S:
    return chunk(q_BSHK, w_BSH, t_S, segment_BS)
  n = -(-S // size)
  pad = n * size - S

  def split(a):
    a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    return a.reshape((B, n, size) + a.shape[2:]).swapaxes(0, 1)

  t_NC = jnp.arange(n * size, dtype=jnp.int32).reshape(n, size)
  idx, top = jax.lax.map(lambda args: chunk(*args), (split(q_BSHK), split(w_BSH), t_NC, split(segment_BS)))
  merge = lambda a: a.swapaxes(0, 1).reshape(B, n * size, topk)[:, :S]
  return merge(idx), merge(top)
