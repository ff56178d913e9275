"""`indexer_topk(q, k, w, visible_end, *, topk, visible_start, implementation)`: the op's single entry point."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.indexer_topk.gpu import supports as gpu_supports
from pallas_kernels.indexer_topk.tpu import MAX_TOPK
from pallas_kernels.indexer_topk.vjp import indexer_topk_vjp

_IMPLEMENTATIONS = ("auto", "reference", "tpu", "gpu")


def causal_visible_end(positions_BS, ratio: int):
  """visible_end for compressed entries numbered from position 0: entry s (tokens [s·m, (s+1)·m)) is complete
  by the query at position p iff s < floor((p + 1) / m)."""
  return ((positions_BS.astype(jnp.int32) + 1) // ratio).astype(jnp.int32)


def indexer_topk(q, k, w, visible_end, *, topk: int, visible_start=None, implementation: str = "auto",
                 query_chunk: int | None = None):
  """Lightning-indexer selection: per query, the `topk` visible compressed entries of highest
  I[t, s] = Σ_h w[t, h] · relu(q[t, h] · k[s]), best first (ties: lower entry index first).

  q [B,S,H,D], k [B,N,D] (cast to q's dtype), w [B,S,H]; entry s is visible to query t iff
  visible_start[t] <= s < visible_end[t] (int32 [B,S]; start defaults to 0; for positions p and ratio m use
  `causal_visible_end(p, m)`; packed documents pass their first entry as start). Returns (indices [B,S,topk]
  int32, -1 where fewer are visible; scores [B,S,topk] float32 at those indices, -inf where -1). The scores are
  differentiable in q, k and w (no gradient through the selection). "auto" is the TPU kernel on a TPU backend
  for topk <= MAX_TOPK, the GPU path on an NVIDIA backend where it takes the head shape, else the reference;
  "tpu" elsewhere runs the kernel in TPU interpret mode (slow: for tests); "gpu" (Hopper, D a multiple of 64 up
  to 256, H <= 256) scores with the Mosaic GPU kernel of gpu.py and selects per query chunk as the reference
  does (H200 check: experiments/check_indexer_topk_gpu.py). `query_chunk` sets the queries per chunk (default:
  a fixed element budget).
  """
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; expected one of {_IMPLEMENTATIONS}")
  if q.ndim != 4 or k.ndim != 3 or w.ndim != 3:
    raise ValueError(f"expected q [B,S,H,D], k [B,N,D], w [B,S,H]; got q{q.shape} k{k.shape} w{w.shape}")
  B, S, H, D = q.shape
  if k.shape[0] != B or k.shape[2] != D:
    raise ValueError(f"k must be [B={B}, N, D={D}], got {k.shape}")
  if w.shape != (B, S, H):
    raise ValueError(f"w must be [B,S,H] = {(B, S, H)}, got {w.shape}")
  if visible_start is None:
    visible_start = jnp.zeros((B, S), jnp.int32)
  for name, a in (("visible_end", visible_end), ("visible_start", visible_start)):
    if a.shape != (B, S) or not jnp.issubdtype(a.dtype, jnp.integer):
      raise ValueError(f"{name} must be integer [B,S] = {(B, S)}, got {a.dtype}{list(a.shape)}")
  if not isinstance(topk, int) or topk < 0:
    raise ValueError(f"topk must be a non-negative int, got {topk!r}")
  if implementation == "gpu":
    if jax.default_backend() != "gpu":
      raise ValueError(f"implementation='gpu' needs an NVIDIA GPU (Hopper) backend; this one is "
                       f"{jax.default_backend()!r}. Use 'auto' or 'reference'")
    if not gpu_supports(D, H):
      raise ValueError(f"implementation='gpu' takes a head dim that is a multiple of 64 up to 256 and at most "
                       f"256 heads; got D {D}, H {H}. Use 'auto' or 'reference'")
  if implementation == "tpu" and topk > MAX_TOPK:
    raise ValueError(f"topk={topk} > {MAX_TOPK} is not supported by the TPU kernel; use implementation='auto' "
                     "or 'reference'")
  if implementation == "auto":
    backend = jax.default_backend()
    if backend == "tpu" and topk <= MAX_TOPK:
      implementation = "tpu"
    elif backend == "gpu" and gpu_supports(D, H):
      implementation = "gpu"
    else:
      implementation = "reference"
  if topk == 0 or k.shape[1] == 0:
    return jnp.full((B, S, topk), -1, jnp.int32), jnp.full((B, S, topk), -jnp.inf, jnp.float32)
  return indexer_topk_vjp(q, k, w, visible_start.astype(jnp.int32), visible_end.astype(jnp.int32), topk,
                          implementation, query_chunk)
