"""Paged FP4 index scores: the definition of the op.

For query row (b, s) and cached key n of sequence b (key n lives in page page_table[b, n // K], row n % K):

  I[b, s, n] = Σ_h w[b, s, h] · relu(q[b, s, h] · key[n])

with the key decoded from its packed MXFP4 row (fp4.unpack) to q's dtype, q·key accumulated in float32 and the
weighted sum in float32: the indexer's score (pallas_kernels.indexer_topk.reference.index_scores) over a
sequence's cached keys read straight from the page pool. Every key slot of every page in the table is scored
(page id -1 reads page 0); which of them a query may see is the caller's mask.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.indexer_topk.reference import index_scores
from pallas_kernels.paged_index_scores import fp4


def gather_keys(pages_PKE, page_table_BP, d: int, dtype):
  """Every key slot of each row's pages, decoded: [B, P·K, d]."""
  rows = pages_PKE[jnp.maximum(page_table_BP, 0)]  # [B, P, K, E]
  return fp4.unpack(rows.reshape(rows.shape[0], -1, rows.shape[-1]), d, dtype)


def paged_index_scores_reference(q_BSHD, w_BSH, pages_PKE, page_table_BP):
  """I [B, S, P·K] float32."""
  keys_BND = gather_keys(pages_PKE, page_table_BP, q_BSHD.shape[-1], q_BSHD.dtype)
  return index_scores(q_BSHD, keys_BND, w_BSH)
