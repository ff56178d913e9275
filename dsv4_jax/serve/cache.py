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
  rank_P = jnp.cumsum(last_P) - last_P
  dest_P = jnp.where(last_P, cache.num_free + rank_P, cache.num_pages)  # past the end: dropped
  return cache.replace(
      free_pages=cache.free_pages.at[dest_P].set(pages_P, mode="drop"), num_free=cache.num_free + jnp.sum(last_P),
      page_table=cache.page_table.at[slot].set(-1), lengths=cache.lengths.at[slot].set(0),
      states=_empty_rows(cache.states, slot))


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


def _continue_in(cache, src, dst, dst_P, pools, num_free, overflow) -> InferenceCache:
  """Slot `dst` continues slot `src`: its length and state rows, page-table row `dst_P` (into `pools`)."""
  return cache.replace(
      pools=pools, states=jax.tree.map(lambda a: a.at[:, dst].set(a[:, src]), cache.states),
      page_table=cache.page_table.at[dst].set(dst_P), lengths=cache.lengths.at[dst].set(cache.lengths[src]),
      num_free=num_free, overflow=cache.overflow | overflow)


@_slot_to_slot
def fork_slot(cache: InferenceCache, src, dst) -> InferenceCache:
  """Slot `dst` (released first; must differ from `src`) continues slot `src`'s sequence: same length and state
  rows, src's full pages shared, its partly filled last page copied to a fresh page (copy-on-write, see the
  module docstring). Sets `overflow` (dst then has no last page: do not use it) if no page is free."""
  src_P = cache.page_table[src]
  length = cache.lengths[src]
  full = length // cache.page_tokens  # pages [0, full) are finished: shared
  partial = (length % cache.page_tokens != 0) & (src_P[jnp.minimum(full, cache.max_pages - 1)] >= 0)
  have = partial & (cache.num_free > 0)
  new = jnp.where(have, cache.free_pages[jnp.maximum(cache.num_free - 1, 0)], -1)
  j_P = jnp.arange(cache.max_pages, dtype=jnp.int32)
  dst_P = jnp.where(j_P < full, src_P, jnp.where(j_P == full, new, -1))
  target = jnp.where(have, new, cache.num_pages)  # no copy: dropped
  last = jnp.maximum(src_P[jnp.minimum(full, cache.max_pages - 1)], 0)
  pools = jax.tree.map(lambda pool: pool.at[:, target].set(pool[:, last], mode="drop"), cache.pools)
  return _continue_in(cache, src, dst, dst_P, pools, cache.num_free - have.astype(jnp.int32), partial & ~have)


@_slot_to_slot
def copy_slot(cache: InferenceCache, src, dst) -> InferenceCache:
  """Slot `dst` (released first; must differ from `src`) becomes a full copy of slot `src`: length, state rows,
  and new pages holding the same entries. Sets `overflow` (copying what fits) if too few pages are free."""
  src_P = cache.page_table[src]
  held = jnp.sum(src_P >= 0)
  j_P = jnp.arange(cache.max_pages, dtype=jnp.int32)
  stack_P = cache.num_free - 1 - j_P
  new_P = jnp.where((j_P < held) & (stack_P >= 0), cache.free_pages[jnp.maximum(stack_P, 0)], -1)
  target_P = jnp.where(new_P >= 0, new_P, cache.num_pages)

  def copy_pages(pool):
    return pool.at[:, target_P].set(pool[:, jnp.maximum(src_P, 0)], mode="drop")

  pools = jax.tree.map(copy_pages, cache.pools)
  return _continue_in(cache, src, dst, new_P, pools, jnp.maximum(cache.num_free - held, 0), held > cache.num_free)


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
