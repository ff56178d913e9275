"""Gather-based sparse attention with a per-head sink: the definition of the op.

For query t and head h, a softmax over the keys `kv[indices[t, j]]` (one K=V head shared by all query heads;
index -1 = no key), with the sink logit in the denominator only:

  out[t,h] = Σ_j exp(s_tj - lse[t,h]) · kv_j,   lse[t,h] = log(Σ_j exp(s_tj) + exp(sink_h)),
  s_tj = scale · q[t,h]·kv_j.

Memory: queries are processed in chunks, so the gathered keys are [chunk, K, D], never [S, S].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._query_chunks import merge_queries, split_queries


def _attend_chunk(q_BCHD, kv_BTD, sink_H, idx_BCK, scale):
  valid_BCK = idx_BCK >= 0
  safe_BCK = jnp.where(valid_BCK, idx_BCK, 0)
  keys_BCKD = jax.vmap(lambda kv, idx: kv[idx])(kv_BTD, safe_BCK)
  s_BCHK = jnp.einsum("BCHD,BCKD->BCHK", q_BCHD, keys_BCKD, preferred_element_type=jnp.float32,
                      precision="highest") * scale
  s_BCHK = jnp.where(valid_BCK[:, :, None, :], s_BCHK, -jnp.inf)
  sink_BCH = jnp.broadcast_to(sink_H.astype(jnp.float32), s_BCHK.shape[:-1])
  m_BCH = jax.lax.stop_gradient(jnp.maximum(jnp.max(s_BCHK, axis=-1), sink_BCH))
  p_BCHK = jnp.exp(s_BCHK - m_BCH[..., None])
  denom_BCH = jnp.sum(p_BCHK, axis=-1) + jnp.exp(sink_BCH - m_BCH)
  lse_BCH = m_BCH + jnp.log(denom_BCH)
  w_BCHK = p_BCHK / denom_BCH[..., None]
  out_BCHD = jnp.einsum("BCHK,BCKD->BCHD", w_BCHK.astype(keys_BCKD.dtype), keys_BCKD,
                        preferred_element_type=jnp.float32, precision="highest")
  return out_BCHD.astype(q_BCHD.dtype), lse_BCH


def sparse_attention_reference(q_BSHD, kv_BTD, sink_H, indices_BSK, *, scale: float, query_chunk: int = 256):
  """Returns (out [B,S,H,D] in q's dtype, lse [B,S,H] float32)."""
  S = q_BSHD.shape[1]
  if S <= query_chunk:
    return _attend_chunk(q_BSHD, kv_BTD, sink_H, indices_BSK, scale)
  q = split_queries(q_BSHD, query_chunk)
  idx = split_queries(indices_BSK, query_chunk, -1)
  chunk_fn = jax.checkpoint(lambda qc, ic: _attend_chunk(qc, kv_BTD, sink_H, ic, scale))
  out, lse = jax.lax.map(lambda args: chunk_fn(*args), (q, idx))
  return merge_queries(out, S), merge_queries(lse, S)
