"""Lightning-indexer top-k: the definition of the op.

For query t and compressed entry s visible to it (visible_start[t] <= s < visible_end[t]):

  I[t, s] = Σ_h w[t, h] · relu(q[t, h] · k[s])

(q·k accumulated in float32 from q's dtype, k cast to it; the weighted sum in float32). Per query, the
`topk` visible entries of highest I, best first, ties to the lower entry index (lax.top_k's order); -1 with
score -inf where fewer than topk are visible. Scores are assumed finite.

Memory: queries go in chunks, so the scores are [chunk, N], never [S, N]; each chunk is rematerialised for the
backward pass when this is differentiated directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._query_chunks import merge_queries, split_queries

SCORE_BUDGET = 1 << 24  # elements of one chunk's [B, C, H, N] relu(q·k) tensor


def index_scores(q_BCHD, k_BND, w_BCH):
  """I [B, C, N] float32 for every (query, entry) pair of a chunk."""
  logits_BCHN = jnp.einsum("BCHD,BND->BCHN", q_BCHD, k_BND.astype(q_BCHD.dtype),
                           preferred_element_type=jnp.float32, precision="highest")
  return jnp.einsum("BCHN,BCH->BCN", jax.nn.relu(logits_BCHN), w_BCH.astype(jnp.float32), precision="highest")


def top_visible(scores_BCN, visible_BCN, k: int):
  """(indices [B, C, k] int32 of the k visible entries of highest score, best first, ties to the lower index;
  -1 past the visible ones; their scores, -inf where -1)."""
  top, idx = jax.lax.top_k(jnp.where(visible_BCN, scores_BCN, -jnp.inf), k)
  chosen = jnp.take_along_axis(visible_BCN, idx, axis=-1)
  return jnp.where(chosen, idx, -1).astype(jnp.int32), jnp.where(chosen, top, -jnp.inf)


def default_query_chunk(B, S, H, N, budget: int = SCORE_BUDGET):
  return max(1, min(S, budget // max(1, B * H * N)))


def indexer_topk_reference(q_BSHD, k_BND, w_BSH, start_BS, end_BS, *, topk: int, query_chunk: int | None = None,
                           scores=None, select=top_visible):
  """(indices [B, S, topk] int32, -1 = none; scores [B, S, topk] float32, -inf where -1).

  `scores(q_BCHD, k_BND, w_BCH, end_BC) -> I [B, C, N]` replaces `index_scores` for a chunk (the GPU path's
  kernel; entries a query cannot see may hold anything: they are masked before the selection); `select`
  replaces `top_visible` (with the same result: the GPU path's radix select)."""
  B, S, H, _ = q_BSHD.shape
  N = k_BND.shape[1]
  k = min(topk, N)
  if k == 0:
    return jnp.full((B, S, topk), -1, jnp.int32), jnp.full((B, S, topk), -jnp.inf, jnp.float32)
  n_N = jnp.arange(N, dtype=jnp.int32)

  @jax.checkpoint
  def chunk(q, w, lo_BC, hi_BC):
    vis_BCN = (n_N >= lo_BC[..., None]) & (n_N < hi_BC[..., None])
    i_BCN = index_scores(q, k_BND, w) if scores is None else scores(q, k_BND, w, hi_BC)
    return select(i_BCN, vis_BCN, k)

  size = query_chunk or default_query_chunk(B, S, H, N)
  if size >= S:
    idx, top = chunk(q_BSHD, w_BSH, start_BS, end_BS)
  else:
    xs = tuple(split_queries(a, size) for a in (q_BSHD, w_BSH, start_BS, end_BS))
    idx, top = jax.lax.map(lambda args: chunk(*args), xs)
    idx, top = merge_queries(idx, S), merge_queries(top, S)
  if k < topk:
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, topk - k)), constant_values=-1)
    top = jnp.pad(top, ((0, 0), (0, 0), (0, topk - k)), constant_values=-jnp.inf)
  return idx, top
