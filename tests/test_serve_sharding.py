"""Sharded serving: the cache's shardings (dsv4_jax.model.cache.cache_shardings), and prefill + decode on 8 fake
CPU devices with the parameters born sharded and the cache sharded equal to one device (logits and cache), the
cache still sharded as intended after the donated steps; the engine's CachedBackend on a mesh too. The device run
is tests/serve_sharded_check.py in a subprocess (the device count must be set before jax starts)."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from dsv4_jax import sharding
from dsv4_jax.config import ModelConfig
from dsv4_jax.model.cache import cache_shardings, init_mtp_cache, mesh_page_shards
from multidevice import run_report

MESH = AbstractMesh((2, 2, 2, 1), sharding.MESH_AXES)


@pytest.fixture(scope="module")
def abstract_cache(tiny_model):
  return lambda batch, **kw: jax.eval_shape(lambda: tiny_model.init_cache(batch, 256, kv_format="float32",
                                                                          page_tokens=128, **kw))


def _specs(tree):
  return [s.spec for s in jax.tree.leaves(tree)]


def test_cache_shardings_split_slots_and_pages(abstract_cache):
  cache = abstract_cache(4)  # 4 slots, 8 pages: both split over data x fsdp
  sh = cache_shardings(cache, MESH)
  assert jax.tree.structure(sh) == jax.tree.structure(cache)
  assert sh.lengths.spec == P(("data", "fsdp")) and sh.page_table.spec == P(("data", "fsdp"), None)
  assert sh.free_pages.spec == P() and sh.num_free.spec == P() and sh.overflow.spec == P()
  states, pools = _specs(sh.states), _specs(sh.pools)
  assert len(states) == len(jax.tree.leaves(cache.states)) and len(pools) == len(jax.tree.leaves(cache.pools)) > 0
  assert all(s == P(None, ("data", "fsdp"), None, None) for s in states + pools)


def test_cache_shardings_with_page_shards(abstract_cache):
  # Page shards: slots and pages over the same axes, those whose product divides page_shards.
  sh = cache_shardings(abstract_cache(4, page_shards=4), MESH)
  assert sh.page_table.spec == P(("data", "fsdp"), None) and sh.free_pages.spec == P()
  assert all(s == P(None, ("data", "fsdp"), None, None) for s in _specs(sh.states) + _specs(sh.pools))
  # 8 pages, 4 slots, 2 shards: pages are not split 4 ways (a slot's shard must be one device's pages).
  sh = cache_shardings(abstract_cache(4, page_shards=2), MESH)
  assert all(s == P(None, "data", None, None) for s in _specs(sh.states) + _specs(sh.pools))
  assert mesh_page_shards(MESH, 4) == 4 and mesh_page_shards(MESH, 2) == 2 and mesh_page_shards(MESH, 3) == 1


def test_cache_shardings_only_dividing_axes(abstract_cache):
  # 2 slots: only "data" divides; 6 pages: "data" (2) divides, data x fsdp (4) does not.
  sh = cache_shardings(abstract_cache(2, num_pages=6), MESH)
  assert sh.page_table.spec == P("data", None)
  assert all(s == P(None, "data", None, None) for s in _specs(sh.states) + _specs(sh.pools))
  # 3 slots, 3 pages: nothing divides, all replicated.
  sh = cache_shardings(abstract_cache(3, num_pages=3), MESH)
  assert all(all(a is None for a in s) for s in _specs(sh))
  # Other axes on request (the expert axis too).
  sh = cache_shardings(abstract_cache(8), MESH, axes=sharding.BATCH_AXES)
  assert sh.page_table.spec == P(("data", "fsdp", "expert"), None)


def test_mtp_cache_takes_the_same_call():
  cache = jax.eval_shape(lambda: init_mtp_cache(ModelConfig.preset("tiny"), 4, 256, kv_format="float32"))
  sh = cache_shardings(cache, MESH)
  assert all(s == P(None, ("data", "fsdp"), None, None) for s in _specs(sh.states))
  assert {s.spec for s in jax.tree.leaves(sh.pools)} <= {P(None, ("data", "fsdp"), None, None)}


@pytest.fixture(scope="module")
def report():
  return run_report(pathlib.Path(__file__).with_name("serve_sharded_check.py"))


@pytest.mark.parametrize("mesh", ["2x2x2x1", "1x2x2x2", "2x2x2x1 page shards"])
def test_sharded_steps_equal_single_device(report, mesh):
  assert report["devices"] == 8
  r = report["meshes"][mesh]
  assert r["sharded_params"] > 20  # parameters born sharded
  assert r["prompt_rel_diff"] < 1e-5 and r["decode_rel_diff"] < 1e-5, r
  assert r["cache_max_abs_diff"] < 1e-4, r
  assert r["lengths"] == [132, 18, 134, 10] and not r["overflow"]  # the window and an HCA block crossed
  assert r["donated"]  # every step consumed the cache it was given
  assert r["shardings_as_intended"], r
  axes = "('data', 'fsdp')" if mesh.startswith("2x2x2x1") else "'fsdp'"
  assert r["pool_specs"] == [f"P(None, {axes}, None, None)"] and r["state_specs"] == r["pool_specs"]
  assert np.isclose(r["pool_shard_fraction"], 0.25 if mesh.startswith("2x2x2x1") else 0.5)  # each device a part


def test_page_shards_keep_page_reads_local(report):
  """A free stack per data x fsdp shard: every slot's pages in its shard's range after the steps and after a fork
  into another shard, and the compiled decode step (traced under the mesh) exchanges no gathered cache rows,
  which the one-stack layout does (an all-reduce of the partial reads, collective-permutes of them)."""
  r = report["page_shards"]
  assert r["shards"] == 4 and r["pages_in_shards"] and r["forked_in_shards"] and not r["fork_overflow"], r
  one, sharded = report["collectives"]["False"], report["collectives"]["True"]
  assert one["all-reduce"][1] >= 1 and one["collective-permute"][1] >= 1, one  # the check can see them
  assert all(rows == 0 for _, rows in sharded.values()), sharded
  assert sharded["all-reduce"][0] < one["all-reduce"][0], (one, sharded)


def test_cached_backend_on_a_mesh(report):
  r = report["backend"]  # against the one-device prompt logits: the decode path's own difference (test_decode) too
  assert r["logits_rel_diff"] < 1e-4, r
  assert r["shardings_as_intended"] and r["pool_specs"] == ["P(None, 'data', None, None)"], r
  assert r["dispatch_ahead"] == {"first_token_is_argmax": True, "tokens_in_vocab": True}, r
