"""Mosaic TPU kernel for the indexer's top-k: exact, in one pass, scores never leave VMEM.

Grid (batch, block of BQ = 8 queries, block of BN = Kp entries), Kp = topk rounded up to a power of two >= 128.
Each step scores its BQ queries against BN entries on the MXU ([BQ·H, D] · [D, BN], relu, the w-weighted sum
over heads), sorts each query's BN scores with a bitonic network, and merges them into the query's running
top-Kp held in VMEM (running best-first ⊕ block worst-first: the elementwise better half is bitonic, one
bitonic merge sorts it). The order is (score descending, entry index ascending), the reference's tie rule, so
the kernel's selection equals the reference's top-k of the kernel's own scores (which differ from the
reference's only by float32 summation order).

Layout: a query's Kp candidates are G = Kp/128 slabs of [BQ, 128] (queries on sublanes, candidates on lanes);
compare-exchanges at distance >= 128 pair whole slabs, shorter ones pair lanes through two lane rotations
(which rotation brings the partner is read off a rotated lane iota, so the rotate direction convention does
not matter). Entry blocks that no query of the block can see are skipped, and their DMA elided (the block
index is clamped to the visible range via scalar prefetch): causal queries do about half the work.

Cost per (query, entry): the score (2·H·D MXU flops) and ~log²(Kp)/2 compare-exchange stages of the sort,
which on hardware may dominate the MXU work; a threshold prefilter (skip blocks whose best cannot enter) is
the next step if it does. Not yet measured on a TPU (compiled for v5p and v6e ahead of time only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention.tpu import INTERPRET, _nt, _on_tpu_or_interpret, _pad, _round_up
from pallas_kernels.sparse_attention.tpu import compile_for_tpu  # noqa: F401  (re-exported for AOT tests)

__all__ = ["INTERPRET", "MAX_TOPK", "compile_for_tpu", "indexer_topk_tpu", "block_sizes"]

BLOCK_Q = 8  # queries per grid step (sublanes)
MAX_TOPK = 2048  # the sort network is unrolled over Kp/128 slabs: compile time and VMEM grow with it
# VMEM per step (estimated from the blocks): q and k blocks double-buffered, the [BQ·H, BN] float32 logits and
# their weighted relu: about 3 MiB at Flash (H = 64, top-512), 5 MiB at top-1024.
VMEM_LIMIT = 32 * 2**20
_NONE = jnp.iinfo(jnp.int32).max  # entry index of an invisible candidate (loses every tie)


def block_sizes(S, H, D, topk):
  """(BQ, Kp = BN, padded S, padded H, padded D)."""
  kp = max(128, 1 << max(0, topk - 1).bit_length())
  return BLOCK_Q, kp, _round_up(S, BLOCK_Q), _round_up(H, 16), _round_up(D, 128)


def _better(va, ia, vb, ib):
  return (va > vb) | ((va == vb) & (ia < ib))


class _Lanes:
  """Per-lane constants of one [BQ, 128] slab, built once per kernel step: lane partners at distance j < 128
  (partner(x)[.., l] = x[.., l ^ j]) and bit masks of the candidate position p = g·128 + lane."""

  def __init__(self, shape):
    self.lane = lax.broadcasted_iota(jnp.int32, shape, 1)
    self._up, self._bits = {}, {}

  def partner(self, x, j):
    if j not in self._up:  # which rotation brings lane l ^ j, read off a rotated iota
      self._up[j] = pltpu.roll(self.lane, j, 1) == (self.lane ^ j)
    return jnp.where(self._up[j], pltpu.roll(x, j, 1), pltpu.roll(x, 128 - j, 1))

  def bit(self, g, m):
    """Whether bit m (a power of two) of p is set: a Python bool when it is constant over the slab."""
    if m >= 128:
      return bool((g * 128) & m)
    if m not in self._bits:
      self._bits[m] = (self.lane & m) != 0
    return self._bits[m]


def _not(x):
  return (not x) if isinstance(x, bool) else ~x


def _exchange(v, i, lanes, j, want_better):
  """One compare-exchange stage at distance j over slabs v, i (lists of [BQ, 128]).

  want_better(g): whether position (g, lane) keeps the better of itself and its partner (a bool when constant
  over the slab, always so for j >= 128, where whole slabs pair up)."""
  G = len(v)
  v, i = list(v), list(i)
  if j >= 128:
    m = j // 128
    for g in range(G):
      if g & m:
        continue
      a_v, a_i, b_v, b_i = v[g], i[g], v[g + m], i[g + m]
      a_wins = _better(a_v, a_i, b_v, b_i)
      keep_a = a_wins if want_better(g) else ~a_wins
      v[g], i[g] = jnp.where(keep_a, a_v, b_v), jnp.where(keep_a, a_i, b_i)
      v[g + m], i[g + m] = jnp.where(keep_a, b_v, a_v), jnp.where(keep_a, b_i, a_i)
    return v, i
  for g in range(G):
    pv, pi = lanes.partner(v[g], j), lanes.partner(i[g], j)
    keep = _better(v[g], i[g], pv, pi) == want_better(g)
    v[g], i[g] = jnp.where(keep, v[g], pv), jnp.where(keep, i[g], pi)
  return v, i


def _sort_worst_first(v, i, lanes):
  """Bitonic sort of the G·128 candidates of each query (position p = g·128 + lane), worst first: runs of
  `size` alternate direction (bit `size` of p set: best first), the last run (size = G·128) worst first. A
  position keeps the better of its pair iff it is the lower one (bit j clear) of a best-first run or the upper
  one of a worst-first run: bit j XOR bit size."""
  L = 128 * len(v)
  for size in (1 << e for e in range(1, L.bit_length())):
    for j in (size >> e for e in range(1, size.bit_length())):
      want_better = lambda g, size=size, j=j: lanes.bit(g, j) ^ lanes.bit(g, size)
      v, i = _exchange(v, i, lanes, j, want_better)
  return v, i


def _merge_best_first(v, i, lanes):
  """Sorts a bitonic sequence best first: the lower position of each pair keeps the better."""
  L = 128 * len(v)
  for j in (L >> e for e in range(1, L.bit_length())):
    v, i = _exchange(v, i, lanes, j, lambda g, j=j: _not(lanes.bit(g, j)))
  return v, i


def _weight_column(w_QH):
  """w [BQ, H] (heads on lanes) -> [BQ·H, 1] (one row per (query, head), as the logits' rows): each query's
  row broadcast down H sublanes, then the diagonal picked out by a lane reduction (no transposes)."""
  bq, H = w_QH.shape
  rows = jnp.concatenate([jnp.broadcast_to(w_QH[r:r + 1, :], (H, H)) for r in range(bq)], axis=0)
  diag = lax.broadcasted_iota(jnp.int32, (bq * H, H), 0) % H == lax.broadcasted_iota(jnp.int32, (bq * H, H), 1)
  return jnp.sum(jnp.where(diag, rows, 0.0), axis=1, keepdims=True)


def _kernel(first_ref, last_ref, lo_ref, hi_ref, q_ref, w_ref, k_ref, idx_ref, val_ref, run_v, run_i, w_col, *,
            n_q_blocks, n_k_blocks):
  # (Grid sizes come in as constants, not pl.num_programs: TPU interpret mode reused a kernel traced for an
  # earlier grid, with its sizes, in a later call of the same kernel.)
  b, qb, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  blk = b * n_q_blocks + qb
  _, bq, H, D = q_ref.shape
  BN = k_ref.shape[1]
  G = run_v.shape[0]

  @pl.when(kb == 0)
  def _():
    run_v[...] = jnp.full(run_v.shape, -jnp.inf, jnp.float32)
    run_i[...] = jnp.full(run_i.shape, _NONE, jnp.int32)
    w_col[...] = _weight_column(w_ref[0])

  @pl.when((kb >= first_ref[blk]) & (kb <= last_ref[blk]))
  def _():
    logits = _nt(q_ref[0].reshape(bq * H, D), k_ref[0])  # [BQ·H, BN]
    weighted = jnp.maximum(logits, 0.0) * w_col[...]
    s = jnp.sum(weighted.reshape(bq, H, BN), axis=1)  # [BQ, BN]
    n = kb * BN + lax.broadcasted_iota(jnp.int32, (bq, BN), 1)
    vis = (n >= lo_ref[0]) & (n < hi_ref[0])
    s, n = jnp.where(vis, s, -jnp.inf), jnp.where(vis, n, _NONE)
    lanes = _Lanes((bq, 128))
    v = [s[:, g * 128:(g + 1) * 128] for g in range(G)]
    i = [n[:, g * 128:(g + 1) * 128] for g in range(G)]
    v, i = _sort_worst_first(v, i, lanes)
    for g in range(G):  # best-first running ⊕ worst-first block: the better of each pair is a bitonic top-Kp
      rv, ri = run_v[g], run_i[g]
      keep = _better(rv, ri, v[g], i[g])
      v[g], i[g] = jnp.where(keep, rv, v[g]), jnp.where(keep, ri, i[g])
    v, i = _merge_best_first(v, i, lanes)
    for g in range(G):
      run_v[g], run_i[g] = v[g], i[g]

  @pl.when(kb == n_k_blocks - 1)
  def _():
    for g in range(G):
      v, i = run_v[g], run_i[g]
      found = v > -jnp.inf
      val_ref[0, :, g * 128:(g + 1) * 128] = jnp.where(found, v, -jnp.inf)
      idx_ref[0, :, g * 128:(g + 1) * 128] = jnp.where(found, i, -1)


def _call(first, last, lo, hi, q, w, k, *, bq, kp, interpret):
  B, Sp, Hp, Dp = q.shape
  Np = k.shape[1]
  nq = Sp // bq
  row = lambda b, i, kb, f, l: (b, i, 0)
  key_block = lambda b, i, kb, f, l: (b, jnp.clip(kb, f[b * nq + i], jnp.maximum(f[b * nq + i], l[b * nq + i])), 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(B, nq, Np // kp),
      in_specs=[pl.BlockSpec((1, bq, 1), row), pl.BlockSpec((1, bq, 1), row),
                pl.BlockSpec((1, bq, Hp, Dp), lambda b, i, kb, f, l: (b, i, 0, 0)),
                pl.BlockSpec((1, bq, Hp), row),
                pl.BlockSpec((1, kp, Dp), key_block)],
      out_specs=[pl.BlockSpec((1, bq, kp), row), pl.BlockSpec((1, bq, kp), row)],
      scratch_shapes=[pltpu.VMEM((kp // 128, bq, 128), jnp.float32), pltpu.VMEM((kp // 128, bq, 128), jnp.int32),
                      pltpu.VMEM((bq * Hp, 1), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_kernel, n_q_blocks=nq, n_k_blocks=Np // kp), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((B, Sp, kp), jnp.int32), jax.ShapeDtypeStruct((B, Sp, kp), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=VMEM_LIMIT),
      interpret=interpret, name="indexer_topk")(first, last, lo, hi, q, w, k)


def indexer_topk_tpu(q_BSHD, k_BND, w_BSH, start_BS, end_BS, *, topk: int):
  """Forward: (indices [B, S, topk] int32, -1 = none; scores [B, S, topk] float32, -inf where -1)."""
  B, S, H, D = q_BSHD.shape
  N = k_BND.shape[1]
  bq, kp, Sp, Hp, Dp = block_sizes(S, H, D, topk)
  Np = _round_up(max(N, 1), kp)
  q = _pad(q_BSHD, (B, Sp, Hp, Dp))
  k = _pad(k_BND.astype(q.dtype), (B, Np, Dp))
  w = _pad(w_BSH.astype(jnp.float32), (B, Sp, Hp))  # padded heads weigh 0
  lo = jnp.clip(start_BS.astype(jnp.int32), 0, N)
  hi = jnp.clip(end_BS.astype(jnp.int32), 0, N)
  hi = jnp.where(hi > lo, hi, 0)
  lo, hi = _pad(lo, (B, Sp)), _pad(hi, (B, Sp))  # padded queries see nothing
  # Entry blocks each query block touches: [first, last] (first > last: none).
  seen = (hi > lo).reshape(B, Sp // bq, bq)
  first = jnp.min(jnp.where(seen, lo.reshape(seen.shape) // kp, Np // kp), axis=-1).astype(jnp.int32)
  last = jnp.max(jnp.where(seen, (hi.reshape(seen.shape) - 1) // kp, -1), axis=-1).astype(jnp.int32)
  first = jnp.minimum(first, Np // kp - 1).reshape(-1)  # (flat: 2-D SMEM pads to 8 rows) a real block for the DMA
  last = last.reshape(-1)
  build = lambda interpret: functools.partial(_call, bq=bq, kp=kp, interpret=interpret)
  idx, val = _on_tpu_or_interpret(build, first, last, lo[..., None], hi[..., None], q, w, k)
  return idx[:, :S, :topk], val[:, :S, :topk]
