"""One custom_vjp for every implementation of the op, and its backward (pure JAX, shared).

Only the selected scores carry gradients (the selection itself is piecewise constant). With l_hj = q_h·k_j for
the entries j a query selected and ds_j the cotangent of its score:

  dw_h = Σ_j ds_j relu(l_hj),   dl_hj = ds_j w_h [l_hj > 0],   dq_h = Σ_j dl_hj k_j,
  dk_j = Σ_{queries, heads that selected j} dl_hj q_h   (scatter-added).

Queries go in chunks that gather their K selected keys: memory O(chunk · H · K), never [S, N]. (A TPU kernel
for this gather backward is not written yet: the forward's cost, scoring every visible entry, dominates it by
about N / K.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._query_chunks import merge_queries, split_queries
from pallas_kernels.indexer_topk import gpu, tpu
from pallas_kernels.indexer_topk.reference import indexer_topk_reference

_F32 = jnp.float32
BWD_BUDGET = 1 << 24  # elements of one chunk's [B, C, H, K] logits


def _chunk_grads(q_BCHD, k_BND, w_BCH, idx_BCK, ds_BCK):
  valid_BCK = idx_BCK >= 0
  keys_BCKD = jax.vmap(lambda k, i: k[i])(k_BND, jnp.where(valid_BCK, idx_BCK, 0)).astype(q_BCHD.dtype)
  l_BCHK = jnp.einsum("BCHD,BCKD->BCHK", q_BCHD, keys_BCKD, preferred_element_type=_F32, precision="highest")
  ds_BCK = jnp.where(valid_BCK, ds_BCK.astype(_F32), 0.0)
  dw_BCH = jnp.einsum("BCHK,BCK->BCH", jax.nn.relu(l_BCHK), ds_BCK, precision="highest")
  dl_BCHK = jnp.where(l_BCHK > 0, w_BCH.astype(_F32)[..., None] * ds_BCK[:, :, None, :], 0.0)
  dq_BCHD = jnp.einsum("BCHK,BCKD->BCHD", dl_BCHK, keys_BCKD.astype(_F32), precision="highest")
  g_BCKD = jnp.einsum("BCHK,BCHD->BCKD", dl_BCHK, q_BCHD.astype(_F32), precision="highest")
  return dq_BCHD, dw_BCH, g_BCKD


def indexer_topk_bwd(q_BSHD, k_BND, w_BSH, idx_BSK, dscores_BSK, *, query_chunk: int | None = None):
  """(dq [B,S,H,D], dk [B,N,D], dw [B,S,H]), float32."""
  B, S, H, D = q_BSHD.shape
  N, K = k_BND.shape[1], idx_BSK.shape[2]
  C = min(S, query_chunk or max(1, BWD_BUDGET // max(1, B * H * K)))
  b_B11 = jnp.arange(B)[:, None, None]

  def step(dk_BND, xs):
    q, w, idx, ds = xs
    dq, dw, g = _chunk_grads(q, k_BND, w, idx, ds)
    return dk_BND.at[b_B11, jnp.where(idx >= 0, idx, N)].add(g, mode="drop"), (dq, dw)

  xs = (split_queries(q_BSHD, C), split_queries(w_BSH, C), split_queries(idx_BSK, C, -1),
        split_queries(dscores_BSK, C))
  dk_BND, (dq, dw) = lax.scan(step, jnp.zeros((B, N, D), _F32), xs)
  return merge_queries(dq, S), dk_BND, merge_queries(dw, S)


def _forward(q, k, w, start, end, topk, implementation, query_chunk):
  if implementation == "reference":
    return indexer_topk_reference(q, k, w, start, end, topk=topk, query_chunk=query_chunk)
  if implementation == "gpu":
    return gpu.indexer_topk_gpu(q, k, w, start, end, topk=topk, query_chunk=query_chunk)
  return tpu.indexer_topk_tpu(q, k, w, start, end, topk=topk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def indexer_topk_vjp(q, k, w, start, end, topk: int, implementation: str, query_chunk):
  """The op with the shared backward; `implementation` is "reference", "tpu" or "gpu"."""
  return _forward(q, k, w, start, end, topk, implementation, query_chunk)


def _fwd(q, k, w, start, end, topk, implementation, query_chunk):
  idx, scores = _forward(q, k, w, start, end, topk, implementation, query_chunk)
  return (idx, scores), (q, k, w, start, end, idx)


def _bwd(topk, implementation, query_chunk, residuals, cotangents):
  q, k, w, start, end, idx = residuals
  _, dscores = cotangents
  dq, dk, dw = indexer_topk_bwd(q, k, w, idx, dscores)
  return dq.astype(q.dtype), dk.astype(k.dtype), dw.astype(w.dtype), None, None


indexer_topk_vjp.defvjp(_fwd, _bwd)
