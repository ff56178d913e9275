"""Serving-side operations on the InferenceCache (dsv4_jax.model.cache): slot reset / copy and byte accounting.

  cache = model.init_cache(batch, max_len, kv_format="fp8")
  cache = reset_slot(cache, slot)          # release: pages back to the free stack, state emptied
  cache = copy_slot(cache, src, dst)       # fork (Quick Instruction): dst becomes a copy of src
  cache_bytes(cache).per_token             # == accounting.kv_cache(cfg, max_len, kv_format).per_token

copy_slot copies the source's pages in full (new pages, same contents); copy-on-write sharing of the finished
pages is not implemented yet. Both are jitted with the cache donated: use only the cache they return.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dsv4_jax.model.cache import CompressorState, InferenceCache, LayerState

__all__ = ["InferenceCache", "CacheBytes", "cache_bytes", "reset_slot", "copy_slot"]


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
  held = jnp.sum(pages_P >= 0)
  j_P = jnp.arange(cache.max_pages, dtype=jnp.int32)
  dest_P = jnp.where(j_P < held, cache.num_free + j_P, cache.num_pages)  # past the end: dropped
  return cache.replace(
      free_pages=cache.free_pages.at[dest_P].set(pages_P, mode="drop"), num_free=cache.num_free + held,
      page_table=cache.page_table.at[slot].set(-1), lengths=cache.lengths.at[slot].set(0),
      states=_empty_rows(cache.states, slot))


@functools.partial(jax.jit, donate_argnums=(0,))
def reset_slot(cache: InferenceCache, slot) -> InferenceCache:
  """Frees slot `slot` (int or int32 scalar): its pages return to the pool, its length and state are emptied."""
  return _release(cache, slot)


def copy_slot(cache: InferenceCache, src, dst) -> InferenceCache:
  """Slot `dst` (released first; must differ from `src`) becomes a full copy of slot `src`: length, state rows,
  and new pages holding the same entries. Sets `overflow` (copying what fits) if too few pages are free."""
  if isinstance(src, int) and isinstance(dst, int) and src == dst:
    raise ValueError(f"copy_slot: src and dst are the same slot ({src})")
  return _copy_slot(cache, src, dst)


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_slot(cache: InferenceCache, src, dst) -> InferenceCache:
  cache = _release(cache, dst)
  src_P = cache.page_table[src]
  held = jnp.sum(src_P >= 0)
  j_P = jnp.arange(cache.max_pages, dtype=jnp.int32)
  stack_P = cache.num_free - 1 - j_P
  new_P = jnp.where((j_P < held) & (stack_P >= 0), cache.free_pages[jnp.maximum(stack_P, 0)], -1)
  target_P = jnp.where(new_P >= 0, new_P, cache.num_pages)

  def copy_pages(pool):
    return pool.at[:, target_P].set(pool[:, jnp.maximum(src_P, 0)], mode="drop")

  pools = jax.tree.map(copy_pages, cache.pools)
  states = jax.tree.map(lambda a: a.at[:, dst].set(a[:, src]), cache.states)
  return cache.replace(
      pools=pools, states=states, page_table=cache.page_table.at[dst].set(new_P),
      lengths=cache.lengths.at[dst].set(cache.lengths[src]), num_free=jnp.maximum(cache.num_free - held, 0),
      overflow=cache.overflow | (held > cache.num_free))


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
