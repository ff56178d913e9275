"""`paged_index_scores(q, w, pages, page_table, *, implementation)`: the lightning indexer's scores over a
sequence's cached MXFP4 keys, read straight from the paged cache (serving; no gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_index_scores import fp4
from pallas_kernels.paged_index_scores.reference import paged_index_scores_reference

_IMPLEMENTATIONS = ("auto", "reference", "gpu")


def paged_index_scores(q, w, pages, page_table, *, implementation: str = "auto"):
  """I[b, s, n] = Σ_h w[b, s, h] · relu(q[b, s, h] · key[b, n]) for every key slot n of row b's pages.

  q [B,S,H,d], w [B,S,H], pages [num_pages, K, row_bytes(d)] uint8 (K keys per page, each packed as
  fp4.unpack reads it), page_table [B,P] int32 (-1 = no page: its slots are scored as page 0's). Returns
  [B, S, P·K] float32; key n of row b is slot n % K of page page_table[b, n // K]. Masking the slots a query
  may not see is the caller's. The keys are decoded to q's dtype and q·k accumulates in float32, as
  indexer_topk's scores. "auto" is the Mosaic GPU kernel (gpu.py) on an NVIDIA backend for the shapes it
  takes, else the reference; "gpu" needs a Hopper GPU. Not differentiable (inference).
  """
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; expected one of {_IMPLEMENTATIONS}")
  if q.ndim != 4 or w.ndim != 3 or pages.ndim != 3 or page_table.ndim != 2:
    raise ValueError(f"expected q [B,S,H,d], w [B,S,H], pages [num_pages,K,E], page_table [B,P]; got "
                     f"q{q.shape} w{w.shape} pages{pages.shape} page_table{page_table.shape}")
  B, S, H, d = q.shape
  if w.shape != (B, S, H):
    raise ValueError(f"w must be [B,S,H] = {(B, S, H)}, got {w.shape}")
  if pages.dtype != jnp.uint8 or pages.shape[-1] != fp4.row_bytes(d):
    raise ValueError(f"pages must be uint8 rows of {fp4.row_bytes(d)} bytes (MXFP4 keys of d = {d}); got "
                     f"{pages.dtype}{list(pages.shape)}")
  if page_table.shape[0] != B or not jnp.issubdtype(page_table.dtype, jnp.integer):
    raise ValueError(f"page_table must be integer [B={B}, P]; got {page_table.dtype}{list(page_table.shape)}")
  backend = jax.default_backend()
  if implementation == "gpu" and backend != "gpu":
    raise ValueError(f"implementation='gpu' needs an NVIDIA GPU (Hopper) backend; this one is {backend!r}. "
                     "Use 'auto' or 'reference'")
  if implementation != "reference":
    from pallas_kernels.paged_index_scores import gpu  # noqa: PLC0415
    takes = gpu.supports(d, H, pages.shape[1], B * S)
    if implementation == "gpu" and not takes:
      raise ValueError(f"the GPU kernel does not take these shapes (d {d}, H {H}, {pages.shape[1]} keys per "
                       f"page, B·S {B * S}); use 'auto' or 'reference'")
    if backend == "gpu" and takes:
      return jax.lax.stop_gradient(gpu.paged_index_scores_gpu(q, w, pages, page_table))
  return jax.lax.stop_gradient(paged_index_scores_reference(q, w, pages, page_table))
