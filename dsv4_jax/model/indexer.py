"""Lightning indexer (spec §6): picks the top-k compressed entries per query in CSA layers.

I[t, s] = Σ_h w[t, h] · relu(q[t, h] · k[s]) over the entries visible to t, through
pallas_kernels.indexer_topk (implementation from cfg.attention_impl): the [S, S/m] score matrix is never
materialised whole (the reference scores queries in chunks, the TPU kernel keeps a running top-k in VMEM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from dsv4_jax.model import kernel_sharding, quant, rope
from dsv4_jax.model.common import param
from dsv4_jax.model.compressor import Compressor
from pallas_kernels.indexer_topk import MAX_TOPK, causal_visible_end, gpu_supports
from pallas_kernels.indexer_topk import reference as indexer_topk_reference

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
    return select_topk_with_scores(q_BSHC, k_BNC, w_BSH, layout, ctx.segment_BS, k, offset,
                                   implementation(cfg, k, q_BSHC.shape[-1], q_BSHC.shape[-2]))


def index_scores(q_BCHK, k_BNK, w_BCH):
  """I [B, C, N] float32 for every (query, entry) pair (the op's definition, pallas_kernels.indexer_topk)."""
  return indexer_topk_reference.index_scores(q_BCHK, k_BNK, w_BCH)


def implementation(cfg, topk: int, head_dim: int, heads: int) -> str:
  """The indexer_topk implementation for cfg.attention_impl: the same, except a top-k beyond the TPU kernel's
  (the dense stage takes every entry) and a head shape the GPU score kernel does not take, which run the
  reference."""
  if cfg.attention_impl == "gpu":
    return "gpu" if gpu_supports(head_dim, heads) else "reference"
  if topk > MAX_TOPK:
    return "reference"
  return cfg.attention_impl


def visible_range(layout, segment_BS):
  """(start, end) [B, S] int32: query t sees entries start[t] <= s < end[t].

  A BlockLayout's visible slots (complete by t, in t's document) are a contiguous run: valid slots come first,
  in order of their last token, and documents are contiguous runs of one segment id. So end = #valid slots
  ending at or before t, start = #valid slots ending before t's document starts. A layout without slot ends
  (decode's cached blocks, given positions for segment_BS) numbers entries from position 0: start 0,
  end = floor((pos + 1) / m).
  """
  if not hasattr(layout, "end_BN"):
    return jnp.zeros_like(segment_BS, jnp.int32), causal_visible_end(segment_BS, layout.ratio)
  S = segment_BS.shape[1]
  t_S = jnp.arange(S, dtype=jnp.int32)
  end_BN = jnp.where(layout.valid_BN, layout.end_BN, jnp.iinfo(jnp.int32).max)
  new_doc_BS = jnp.concatenate([jnp.ones_like(segment_BS[:, :1], bool), segment_BS[:, 1:] != segment_BS[:, :-1]],
                               axis=1)
  doc_start_BS = jax.lax.cummax(jnp.where(new_doc_BS, t_S[None, :], 0), axis=1)
  count = jax.vmap(lambda ends, t, side: jnp.searchsorted(ends, t, side=side).astype(jnp.int32),
                   in_axes=(0, 0, None))
  return count(end_BN, doc_start_BS, "left"), count(end_BN, jnp.broadcast_to(t_S, segment_BS.shape), "right")


def select_topk(q_BSHK, k_BNK, w_BSH, layout, segment_BS, topk: int, offset: int, impl: str = "reference"):
  """Top-k visible entry indices per query [B, S, topk] (+offset, -1 where fewer are visible)."""
  return select_topk_with_scores(q_BSHK, k_BNK, w_BSH, layout, segment_BS, topk, offset, impl)[0]


def select_topk_with_scores(q_BSHK, k_BNK, w_BSH, layout, segment_BS, topk: int, offset: int,
                            impl: str = "reference"):
  """(indices as select_topk, the selected entries' index scores [B, S, topk] float32, -inf where -1).

  pallas_kernels.indexer_topk with implementation `impl`; the scores are differentiable in q, k and w (the
  reference scores queries in chunks of at most _SCORE_BUDGET elements; the GPU path chooses its own).
  """
  B, S, H, _ = q_BSHK.shape
  N = k_BNK.shape[1]
  if N == 0 or topk == 0:
    return jnp.full((B, S, 0), -1, jnp.int32), jnp.zeros((B, S, 0), jnp.float32)
  start_BS, end_BS = visible_range(layout, segment_BS)
  # chunks of [C, H, N] relu(q·k) as the reference holds them; the GPU path sizes its own ([C, N] scores: this
  # sizing would split it into H times more kernel launches and selections)
  chunk = None if impl in ("gpu", "auto") else max(1, min(S, _SCORE_BUDGET // max(1, B * H * N)))
  kernel = lambda q, k, w, end, start: pallas_kernels.indexer_topk(q, k, w, end, visible_start=start, topk=topk,
                                                                   implementation=impl, query_chunk=chunk)
  idx_BSK, scores_BSK = kernel_sharding.per_shard(  # heads stay whole: the scores sum over them before the top-k
      "indexer_topk", kernel, (q_BSHK, k_BNK, w_BSH, end_BS, start_BS), ("BSHD", "BND", "BSH", "BS", "BS"),
      ("BSK", "BSK"), implementation=impl)
  return jnp.where(idx_BSK >= 0, idx_BSK + offset, -1).astype(jnp.int32), scores_BSK
