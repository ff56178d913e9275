"""Sort-free exact top-k selection: the entries `top_visible` picks, found by a radix search for the k-th
largest score and one compaction, in entry-index order.

Why: lax.top_k on an NVIDIA GPU is a CUB segmented radix sort of every row (a custom call that copies its
segment offsets from the host each run and cannot sit inside a CUDA graph), then a slice. Decode needs only
the set of k picked entries (attention sums over them in any order), so a search over the 32 bits of an
order-preserving integer key (a few compare-and-count passes over [rows, N]) and prefix sums done as small
triangular matmuls select the same set with elementwise, reduction and matmul kernels only.

Ties go to the lower entry index, as in lax.top_k, so the set is exactly top_visible's. Scores are assumed
finite (NaN unsupported); -0.0 and +0.0 count as equal, as lax.top_k compares them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PREFIX_BLOCK = 128  # width of one triangular matmul of the prefix sums


def order_keys(scores_N, visible_N):
  """uint32 keys ordered as the float scores (visible ones >= 2**23) with 0 for entries not visible."""
  s = jnp.where(scores_N == 0, jnp.float32(0), scores_N.astype(jnp.float32))  # -0.0 -> +0.0
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
  return jnp.where(visible_N, key, jnp.uint32(0))


def kth_largest(keys_RN, k: int, bits_per_pass: int = 4):
  """[R] the k-th largest key of each row (0 where a row has fewer than k keys above 0): the largest t with
  #(key >= t) >= k, built digit by digit from the top (the count only falls as t grows)."""
  if 32 % bits_per_pass:
    raise ValueError(f"bits_per_pass must divide 32, got {bits_per_pass}")
  digits = jnp.arange(1, 1 << bits_per_pass, dtype=jnp.uint32)
  t_R = jnp.zeros(keys_RN.shape[:-1], jnp.uint32)
  for shift in range(32 - bits_per_pass, -1, -bits_per_pass):
    cand_RD = t_R[..., None] + (digits << shift)
    count_RD = jnp.sum(keys_RN[..., None, :] >= cand_RD[..., None], axis=-1, dtype=jnp.int32)
    t_R = t_R + (jnp.sum(count_RD >= k, axis=-1).astype(jnp.uint32) << shift)
  return t_R


def inclusive_counts(flags_RN):
  """Inclusive prefix sums of 0/1 flags along the last axis, int32: blocks of PREFIX_BLOCK by a triangular
  matmul (exact: float32 sums of 0/1 stay integers), block totals by the same recursively."""
  *lead, n = flags_RN.shape
  b = PREFIX_BLOCK
  x = flags_RN.astype(jnp.float32)
  if n <= b:
    tri = jnp.triu(jnp.ones((n, n), jnp.float32))  # tri[i, j] = 1 for i <= j
    return jnp.einsum("...i,ij->...j", x, tri, precision="highest").astype(jnp.int32)
  nb = -(-n // b)
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nb * b - n)]).reshape(*lead, nb, b)
  tri = jnp.triu(jnp.ones((b, b), jnp.float32))
  within = jnp.einsum("...ni,ij->...nj", x, tri, precision="highest").astype(jnp.int32)
  before = inclusive_counts(within[..., -1]) - within[..., -1]  # exclusive prefix of the block totals
  return (within + before[..., None]).reshape(*lead, nb * b)[..., :n]


def select_top_k(scores_BCN, visible_BCN, k: int, bits_per_pass: int = 4):
  """indices [B, C, k] int32 of the k visible entries of highest score (ties to the lower index), in
  increasing index order, -1 past the visible ones: the set top_visible returns, not its order."""
  *lead, n = scores_BCN.shape
  if not 0 < k <= n:
    raise ValueError(f"select_top_k: need 0 < k <= N, got k={k}, N={n}")
  keys = order_keys(scores_BCN, visible_BCN)
  t = kth_largest(keys, k, bits_per_pass)[..., None]
  above = keys > t
  tie = (keys == t) & (t > 0)  # t == 0: fewer than k visible; the ties would be entries not visible
  counts = inclusive_counts(jnp.stack([above, tie]))
  need = k - counts[0, ..., -1:]  # ties to take, lowest index first
  take = above | (tie & (counts[1] <= need))
  slot = counts[0] + jnp.minimum(counts[1], need) - 1  # rank among the taken, for the taken entries
  slot = jnp.where(take, slot, k)  # the rest go out of bounds and are dropped
  rows = math.prod(lead)
  slot_RN = slot.reshape(rows, n)
  r_RN = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, n))
  n_RN = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], (rows, n))
  out = jnp.full((rows, k), -1, jnp.int32).at[r_RN, slot_RN].set(n_RN, mode="drop")
  return out.reshape(*lead, k)
