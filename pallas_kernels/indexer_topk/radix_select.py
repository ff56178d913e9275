"""Top-k selection by radix select instead of a sort: the same result as reference.top_visible, bit for bit.

lax.top_k with a large k (512 of 32K entries) sorts each row on a GPU. Here each score becomes an unsigned key
whose order is the float order (invisible entries key 0, below every finite score); the k-th largest key is
found `bits` bits at a time from the top, each round counting per row how many keys in the current bucket
have each next digit or larger (row reductions over the chunk, no sort); then the keys above it and the first
ties at it (lowest entries first, as top_k breaks ties) are compacted by a running count, and only those k are
sorted (key descending, entry ascending). Work: 32/bits rounds of 2^bits counts over [C, N], two running
counts and one scatter, instead of sorting [C, N]; 2 bits a round measured fastest on the H200
(experiments/bench_indexer_select.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_U32 = jnp.uint32


def order_keys(scores, visible):
  """uint32 keys in the float32 scores' total order (-0.0 below +0.0, as lax.top_k orders them); 0 where not
  visible."""
  b = lax.bitcast_convert_type(scores.astype(jnp.float32), _U32)
  key = jnp.where((b >> 31) == 1, ~b, b | _U32(0x80000000))
  return jnp.where(visible, key, _U32(0))


def kth_largest(key, k, bits: int = 2):
  """(t, ties): per row the k-th largest key and how many keys equal to it rank within the top k."""
  need = jnp.full(key.shape[:-1], k, jnp.int32)
  prefix = jnp.zeros(key.shape[:-1], _U32)
  levels = 1 << bits
  for shift in range(32 - bits, -1, -bits):
    high = _U32((0xFFFFFFFF << (shift + bits)) & 0xFFFFFFFF) if shift + bits < 32 else _U32(0)
    in_bucket = (key & high) == prefix[..., None]
    digit = (key >> shift) & _U32(levels - 1)
    # at_least[v]: keys in the bucket whose digit is >= v (v = 0 .. levels; none at levels), non-increasing in v
    at_least = jnp.stack([jnp.sum(in_bucket & (digit >= v), axis=-1, dtype=jnp.int32) for v in range(levels)]
                         + [jnp.zeros_like(need)], axis=-1)
    v = jnp.sum(at_least >= need[..., None], axis=-1, dtype=jnp.int32) - 1  # the largest v with enough keys
    need = need - jnp.take_along_axis(at_least, (v + 1)[..., None], -1)[..., 0]  # less the keys above digit v
    prefix = prefix | (v.astype(_U32) << shift)
  return prefix, need


def radix_top_visible(scores_BCN, visible_BCN, k: int, bits: int = 2):
  """As reference.top_visible: (indices [B, C, k] int32 of the k visible entries of highest score, best first,
  ties to the lower index, -1 past the visible ones; their scores, -inf where -1). Needs k <= N."""
  N = scores_BCN.shape[-1]
  if not 0 < k <= N:
    raise ValueError(f"k must be in 1..N={N}, got {k}")
  if bits not in (1, 2, 4, 8):
    raise ValueError(f"bits must be 1, 2, 4 or 8 (a divisor of 32; 2^bits counts a round), got {bits}")
  lead = scores_BCN.shape[:-1]
  scores_RN = scores_BCN.reshape(-1, N).astype(jnp.float32)
  visible_RN = visible_BCN.reshape(-1, N)
  key_RN = order_keys(scores_RN, visible_RN)
  t_R, ties_R = kth_largest(key_RN, k, bits)
  tied_RN = key_RN == t_R[:, None]
  take_RN = (key_RN > t_R[:, None]) | (tied_RN & (jnp.cumsum(tied_RN, axis=-1, dtype=jnp.int32) <= ties_R[:, None]))
  slot_RN = jnp.where(take_RN, jnp.cumsum(take_RN, axis=-1, dtype=jnp.int32) - 1, k)  # k: dropped
  R = key_RN.shape[0]
  row_RN = jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32)[:, None], (R, N))
  n_RN = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32)[None, :], (R, N))
  idx_RK = jnp.zeros((R, k), jnp.int32).at[row_RN, slot_RN].set(n_RN, mode="drop")
  sel_key_RK = jnp.take_along_axis(key_RN, idx_RK, axis=-1)
  _, idx_RK = lax.sort((~sel_key_RK, idx_RK), dimension=-1, num_keys=2)  # key descending, then entry ascending
  chosen_RK = jnp.take_along_axis(visible_RN, idx_RK, axis=-1)
  top_RK = jnp.take_along_axis(scores_RN, idx_RK, axis=-1)
  idx = jnp.where(chosen_RK, idx_RK, -1).astype(jnp.int32).reshape(lead + (k,))
  return idx, jnp.where(chosen_RK, top_RK, -jnp.inf).reshape(lead + (k,))
