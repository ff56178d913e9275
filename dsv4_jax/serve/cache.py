"""Serving-side operations on the InferenceCache (dsv4_jax.model.cache): slot reset / copy and byte accounting.

  cache = model.init_cache(batch, max_len, kv_format="fp8")
  cache = reset_slot(cache, slot)          # release: pages back to the free stack, state emptied
  cache = fork_slot(cache, src, dst)       # fork (Quick Instruction): dst continues src, finished pages shared
  cache = copy_slot(cache, src, dst)       # dst becomes a copy of src on pages of its own
  cache_bytes(cache).per_token             # == accounting.kv_cache(cfg, max_len, kv_format).per_token

fork_slot is copy-on-write at page granularity: the pages src filled to their end are never written again (a
sequence only writes entries of its own later tokens), so dst's page table points at the same pages; the last,
partly filled page (the only one either sequence writes into next) is copied to a fresh page at fork time, and
the per-slot state rows are copied. A page is shared by as many slots as hold it (model.cache.page_refcounts);
releasing a slot returns to the free stack only the pages no other slot holds. copy_slot copies every page.
With page shards (model.cache: a free stack per shard of slots), new pages come from the destination slot's
shard and a fork into another shard copies every page (a slot never holds another shard's pages); released pages
return to the stack of the shard they belong to.
All are jitted with the cache donated: use only the cache they return.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dsv4_jax.model.cache import CompressorState, InferenceCache, LayerState, page_refcounts

__all__ = ["InferenceCache", "CacheBytes", "cache_bytes", "reset_slot", "copy_slot", "fork_slot", "page_refcounts"]


def _empty_rows(states, slot):
  """Per-slot state of `slot` back to empty: window zeros, compressor tails kv 0 / score -inf."""

  def layer(st: LayerState) -> LayerState:
    comp = lambda c: None if c is None else CompressorState(c.kv.at[:, slot].set(0.0),
                                                             c.score.at[:, slot].set(-jnp.inf))
    return LayerState(window=st.window.at[:, slot].set(0), compressor=comp(st.compressor),
                      index_compressor=comp(st.index_compressor))

  return tuple(tuple(layer(st) for st in stack) for stack in states)


def _release(cache: InferenceCache, slot) -> InferenceCache:
  pages_P = cache.page_table[slot]
  last_P = (pages_P >= 0) & (page_refcounts(cache)[jnp.maximum(pages_P, 0)] == 1)  # held by this slot only
  free_DN, num_free_D = cache.free_stacks()
  D, n = free_DN.shape
  shard_P = jnp.maximum(pages_P, 0) // n  # pushed onto the stack of the page's own shard
  last_PD = last_P[:, None] & (shard_P[:, None] == jnp.arange(D))
  rank_P = jnp.sum(jnp.cumsum(last_PD, axis=0) - last_PD, axis=1)
  dest_P = jnp.where(last_P, num_free_D[shard_P] + rank_P, n)  # past the end: dropped
  free, num_free = cache.stacked_like(free_DN.at[shard_P, dest_P].set(pages_P, mode="drop"),
                                      num_free_D + jnp.sum(last_PD, axis=0))
  return cache.replace(
      free_pages=free, num_free=num_free, page_table=cache.page_table.at[slot].set(-1),
      lengths=cache.lengths.at[slot].set(0), states=_empty_rows(cache.states, slot))


@functools.partial(jax.jit, donate_argnums=(0,))
def reset_slot(cache: InferenceCache, slot) -> InferenceCache:
  """Frees slot `slot` (int or int32 scalar): its pages return to the pool, its length and state are emptied."""
  return _release(cache, slot)


def _slot_to_slot(body):
  """The public op of `body(cache, src, dst)`: jitted with the cache donated, slot `dst` released before `body`
  sees the cache; equal Python-int slots are refused."""

  @functools.wraps(body)
  def released(cache, src, dst):
    return body(_release(cache, dst), src, dst)

  jitted = jax.jit(released, donate_argnums=(0,))

  @functools.wraps(body)
  def op(cache: InferenceCache, src, dst) -> InferenceCache:
    if isinstance(src, int) and isinstance(dst, int) and src == dst:
      raise ValueError(f"{body.__name__}: src and dst are the same slot ({src})")
    return jitted(cache, src, dst)

  return op


def _continue_in(cache, src, dst, dst_P, pools, stacks, overflow) -> InferenceCache:
  """Slot `dst` continues slot `src`: its length and state rows, page-table row `dst_P` (into `pools`)."""
  free, num_free = stacks
  return cache.replace(
      pools=pools, states=jax.tree.map(lambda a: a.at[:, dst].set(a[:, src]), cache.states),
      page_table=cache.page_table.at[dst].set(dst_P), lengths=cache.lengths.at[dst].set(cache.lengths[src]),
      free_pages=free, num_free=num_free, overflow=cache.overflow | overflow)


def _copy_pages(cache, src_P, want_P, dst):
  """Fresh pages from slot `dst`'s shard for the positions `want_P` of page-table row `src_P`, holding copies
  of src's pages there: (new page ids [P] (-1 where not wanted or none left), pools, free stacks, overflow)."""
  free_DN, num_free_D = cache.free_stacks()
  shard = cache.slot_shard(dst)
  rank_P = jnp.cumsum(want_P) - want_P
  stack_P = num_free_D[shard] - 1 - rank_P
  new_P = jnp.where(want_P & (stack_P >= 0), free_DN[shard, jnp.maximum(stack_P, 0)], -1)
  target_P = jnp.where(new_P >= 0, new_P, cache.num_pages)  # no copy: dropped
  pools = jax.tree.map(lambda pool: pool.at[:, target_P].set(pool[:, jnp.maximum(src_P, 0)], mode="drop"),
                       cache.pools)
  popped = jnp.sum(new_P >= 0).astype(jnp.int32)
  stacks = cache.stacked_like(free_DN, num_free_D.at[shard].add(-popped))
  return new_P, pools, stacks, jnp.any(want_P & (new_P < 0))


@_slot_to_slot
def fork_slot(cache: InferenceCache, src, dst) -> InferenceCache:
  """Slot `dst` (released first; must differ from `src`) continues slot `src`'s sequence: same length and state
  rows, src's full pages shared, its partly filled last page copied to a fresh page (copy-on-write, see the
  module docstring); with src and dst in different page shards every page is copied (into dst's shard). Sets
  `overflow` (dst then misses pages: do not use it) if too few pages are free."""
  src_P = cache.page_table[src]
  length = cache.lengths[src]
  full = length // cache.page_tokens  # pages [0, full) are finished: shared
  partial = (length % cache.page_tokens != 0) & (src_P[jnp.minimum(full, cache.max_pages - 1)] >= 0)
  j_P = jnp.arange(cache.max_pages, dtype=jnp.int32)
  same = cache.slot_shard(src) == cache.slot_shard(dst)
  want_P = ((j_P < full) & ~same) | ((j_P == full) & partial)
  new_P, pools, stacks, overflow = _copy_pages(cache, src_P, want_P, dst)
  dst_P = jnp.where(want_P, new_P, jnp.where(j_P < full, src_P, -1))
  return _continue_in(cache, src, dst, dst_P, pools, stacks, overflow)


@_slot_to_slot
def copy_slot(cache: InferenceCache, src, dst) -> InferenceCache:
  """Slot `dst` (released first; must differ from `src`) becomes a full copy of slot `src`: length, state rows,
  and new pages (from dst's page shard) holding the same entries. Sets `overflow` (copying what fits) if too few
  pages are free."""
  src_P = cache.page_table[src]
  want_P = jnp.arange(cache.max_pages, dtype=jnp.int32) < jnp.sum(src_P >= 0)
  new_P, pools, stacks, overflow = _copy_pages(cache, src_P, want_P, dst)
  return _continue_in(cache, src, dst, new_P, pools, stacks, overflow)


@dataclasses.dataclass(frozen=True)
class CacheBytes:
  """Bytes a cache allocates, by part (the parts of accounting.KVCache, for all slots)."""
  window: int  # window rings of every layer
  compressed: int  # pages of CSA / HCA entries
  indexer: int  # pages of indexer keys
  compressor_state: int  # compressor tails (float32), reported apart as in accounting
  metadata: int  # lengths, page table, free stack
  batch: int
  max_len: int

  @property
  def total(self) -> int:
    """window + compressed + indexer, as accounting.KVCache.total (compressor state apart)."""
    return self.window + self.compressed + self.indexer

  @property
  def per_sequence(self) -> float:
    return self.total / self.batch

  @property
  def per_token(self) -> float:
    """Allocated bytes per token of slot capacity: total / (batch · max_len)."""
    return self.total / (self.batch * self.max_len)


def cache_bytes(cache: InferenceCache) -> CacheBytes:
  """Allocated bytes of `cache`; also takes `jax.eval_shape(...)` of one (sizes without allocating)."""
  nbytes = lambda tree: sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
  states = [st for stack in cache.states for st in stack]
  pools = [pl for stack in cache.pools for pl in stack]
  return CacheBytes(
      window=nbytes([st.window for st in states]),
      compressed=nbytes([pl.entries for pl in pools]),
      indexer=nbytes([pl.index_keys for pl in pools]),
      compressor_state=nbytes([(st.compressor, st.index_compressor) for st in states]),
      metadata=nbytes((cache.lengths, cache.page_table, cache.free_pages, cache.num_free, cache.overflow)),
      batch=cache.batch, max_len=cache.max_len)
