"""Page shards (dsv4_jax.model.cache, page_shards = D): a free stack per shard of slots, so a slot's pages lie in
its shard's id range. One device here: allocation, release, fork / copy across and within shards, a shard
running out; and a tiny model's prefill + decode with D = 2 equal to D = 1. The sharded run (pages read per
device, no exchange of gathered rows) is tests/test_serve_sharding.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.config import ModelConfig
from dsv4_jax.model.cache import allocate_pages, init_cache, page_refcounts
from dsv4_jax.model.transformer import layer_plan
from dsv4_jax.serve.cache import copy_slot, fork_slot, reset_slot

CFG = ModelConfig.preset("tiny")


def _cache(batch=4, max_len=512, num_pages=None, page_shards=2):
  return init_cache(CFG, layer_plan(CFG), batch, max_len, kv_format="float32", page_tokens=128,
                    num_pages=num_pages, page_shards=page_shards)


def _assert_in_shards(cache):
  """Every slot's pages lie in its shard's id range, no page is held by two shards' slots or free twice."""
  table, D = np.asarray(cache.page_table), cache.page_shards
  n, per_shard = cache.num_pages // D, cache.batch // D
  for b, row in enumerate(table):
    s = b // per_shard
    held = row[row >= 0]
    assert np.all((held >= s * n) & (held < (s + 1) * n)), (b, row)
  free, num_free = np.asarray(cache.free_pages).reshape(D, n), np.asarray(cache.num_free).reshape(D)
  for s in range(D):
    stack = free[s, :num_free[s]]
    assert np.all((stack >= s * n) & (stack < (s + 1) * n)), (s, stack)
    assert not set(stack) & set(table.reshape(-1)), (s, stack)  # a free page is held by no slot
  assert int(num_free.sum()) + int(np.sum(np.asarray(page_refcounts(cache)) > 0)) == cache.num_pages


def test_layout_and_bad_shards():
  cache = _cache(num_pages=8)
  assert cache.free_pages.shape == (2, 4) and cache.num_free.shape == (2,) and cache.num_pages == 8
  np.testing.assert_array_equal(cache.free_pages, [[3, 2, 1, 0], [7, 6, 5, 4]])  # lowest ids popped first
  one = _cache(num_pages=8, page_shards=1)  # today's flat layout
  assert one.free_pages.shape == (8,) and one.num_free.shape == ()
  for kw in (dict(page_shards=3), dict(page_shards=2, num_pages=7), dict(page_shards=0)):
    with pytest.raises(ValueError, match="page_shards"):
      _cache(**kw)


def test_allocation_takes_the_rows_shard_and_overflows_per_shard():
  cache = _cache(num_pages=8)  # slots 0, 1 -> pages 0..3; slots 2, 3 -> pages 4..7
  table = jnp.full((4, 4), -1, jnp.int32)
  table, _, num_free, overflow = allocate_pages(cache, table, jnp.asarray([300, 100, 1, 0]))
  np.testing.assert_array_equal(table, [[0, 1, 2, -1], [3, -1, -1, -1], [4, -1, -1, -1], [-1] * 4])
  np.testing.assert_array_equal(num_free, [0, 3])
  assert not bool(overflow)
  # A subset of slots (rows -> slots 3, 0): each row takes its slot's shard.
  sub = jnp.full((2, 4), -1, jnp.int32)
  sub, _, num_free, overflow = allocate_pages(cache, sub, jnp.asarray([200, 100]), jnp.asarray([3, 0]))
  np.testing.assert_array_equal(sub, [[4, 5, -1, -1], [0, -1, -1, -1]])
  # Shard 0 runs out (6 pages wanted from its 4) while shard 1 has 4 free: overflow, the rest still served.
  table = jnp.full((4, 4), -1, jnp.int32)
  table, _, num_free, overflow = allocate_pages(cache, table, jnp.asarray([300, 257, 0, 0]))
  assert bool(overflow)
  np.testing.assert_array_equal(num_free, [0, 4])
  np.testing.assert_array_equal(table[:2], [[0, 1, 2, -1], [3, -1, -1, -1]])
  # One stack for all (D = 1): the same 6 pages fit in 8.
  _, _, num_free, overflow = allocate_pages(_cache(num_pages=8, page_shards=1), jnp.full((4, 4), -1, jnp.int32),
                                            jnp.asarray([300, 257, 0, 0]))
  assert not bool(overflow) and int(num_free) == 2


def _fill(cache, slot, length, key):
  """Slot `slot` given `length` tokens' pages (allocate_pages, as a step does) and random pool contents."""
  table, free, num_free, overflow = allocate_pages(cache, cache.page_table[slot][None],
                                                   jnp.asarray([length]), jnp.asarray([slot]))
  pools = jax.tree.map(lambda a: jax.random.normal(jax.random.fold_in(key, a.size), a.shape, a.dtype), cache.pools)
  return cache.replace(page_table=cache.page_table.at[slot].set(table[0]), free_pages=free, num_free=num_free,
                       overflow=cache.overflow | overflow, lengths=cache.lengths.at[slot].set(length), pools=pools)


def _pages_equal(cache, a, b, n_pages):
  pa, pb = np.asarray(cache.page_table[a])[:n_pages], np.asarray(cache.page_table[b])[:n_pages]
  for pool in jax.tree.leaves(cache.pools):
    np.testing.assert_array_equal(np.asarray(pool)[:, pa], np.asarray(pool)[:, pb])


def test_fork_copy_release_stay_in_shards():
  cache = _fill(_cache(num_pages=16), 0, 300, jax.random.key(0))  # 3 pages of shard 0, the last partly filled
  # Fork within the shard (0 -> 1): the 2 full pages shared, the partial one copied.
  cache = fork_slot(cache, 0, 1)
  table = np.asarray(cache.page_table)
  assert list(table[1, :2]) == list(table[0, :2]) and table[1, 2] != table[0, 2] and table[1, 3] == -1
  _pages_equal(cache, 0, 1, 3)
  _assert_in_shards(cache)
  # Fork into the other shard (0 -> 2): every page copied into shard 1, nothing shared across shards.
  cache = fork_slot(cache, 0, 3)
  table = np.asarray(cache.page_table)
  assert np.all(table[3, :3] >= 8) and table[3, 3] == -1
  _pages_equal(cache, 0, 3, 3)
  _assert_in_shards(cache)
  np.testing.assert_array_equal(cache.num_free, [8 - 4, 8 - 3])
  # copy_slot into the other shard, then releases: pages return to their own shard's stack.
  cache = copy_slot(cache, 1, 2)
  _pages_equal(cache, 1, 2, 3)
  _assert_in_shards(cache)
  assert not bool(cache.overflow)
  for slot in (0, 2, 1, 3):
    cache = reset_slot(cache, slot)
    _assert_in_shards(cache)
  np.testing.assert_array_equal(cache.num_free, [8, 8])
  assert sorted(np.asarray(cache.free_pages)[0]) == list(range(8))


def test_fork_into_a_full_shard_overflows():
  cache = _fill(_cache(num_pages=8), 0, 300, jax.random.key(1))  # shard 1 (pages 4..7) then filled by slot 2
  cache = _fill(cache, 2, 512, jax.random.key(2))
  assert not bool(cache.overflow)
  cache = fork_slot(cache, 0, 1)  # within shard 0: the one partial page fits
  assert not bool(cache.overflow)
  _assert_in_shards(cache)
  assert bool(fork_slot(cache, 0, 3).overflow)  # shard 1 has no page left (shard 0 still has its last one)


def test_model_steps_equal_with_page_shards(model_factory):
  """Prefill + decode on a cache of 2 page shards equal those on one stack (same entries, other page ids)."""
  from dsv4_jax.serve.steps import make_decode, make_prefill
  tiny_model = model_factory(ModelConfig.preset("tiny", num_hidden_layers=2, compress_ratios=(4, 128),
                                                num_nextn_predict_layers=0))  # a CSA and an HCA layer
  prefill, decode = make_prefill(tiny_model), make_decode(tiny_model)
  tokens = np.random.default_rng(0).integers(0, tiny_model.cfg.vocab_size, (4, 140)).astype(np.int32)
  lengths = jnp.asarray([130, 5, 129, 20])
  out = {}
  for D in (1, 2):
    cache = tiny_model.init_cache(4, 256, kv_format="float32", page_tokens=128, page_shards=D)
    logits, cache = prefill(jnp.asarray(tokens[:, :136]), cache, lengths)
    steps = [np.asarray(logits)]
    for i in range(2):
      logits, cache = decode(jnp.asarray(tokens[np.arange(4), np.asarray(lengths) + i][:, None]), cache)
      steps.append(np.asarray(logits))
    out[D] = steps
    if D == 2:
      _assert_in_shards(cache)
  for a, b in zip(out[1], out[2]):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
