"""The model's use of pallas_kernels.indexer_topk: the visible entry ranges it passes equal the block layout's
visibility mask (packed documents, continued documents, decode positions), and the indexer selects the same
entries with implementation "tpu" (interpret mode) as with the reference."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.model import context, indexer
from dsv4_jax.model.indexer import Indexer


def _mask(start, end, N):
  n = np.arange(N)
  return (n >= np.asarray(start)[..., None]) & (n < np.asarray(end)[..., None])


@pytest.mark.parametrize("segment,first_position", [
    ([0] * 37, 0), ([0] * 13 + [1] * 6 + [2] * 18, 0), ([5] * 3 + [7] * 30 + [9] * 9, 0),
    ([0] * 40, 6), ([0] * 11 + [1] * 29, 2), ([3] * 4 + [4] * 4 + [5] * 4 + [6] * 20, 0)])
@pytest.mark.parametrize("ratio", [4, 8])
def test_visible_range_equals_layout_mask(segment, first_position, ratio):
  seg = jnp.asarray([segment], jnp.int32)
  positions = context.document_positions(seg)
  positions = positions + jnp.where(seg == seg[:, :1], first_position, 0)  # the first document continues
  layout = context.block_layout(positions, seg, ratio)
  S = seg.shape[1]
  want = np.asarray(layout.visible_BCN(jnp.arange(S, dtype=jnp.int32), seg))
  start, end = indexer.visible_range(layout, seg)
  np.testing.assert_array_equal(_mask(start, end, S // ratio), want)
  assert want.any()


def test_visible_range_of_decode_positions():
  @dataclasses.dataclass(frozen=True)
  class Cached:  # what decode passes: a ratio and no slot ends; positions instead of segment ids
    ratio: int
  positions = jnp.asarray([[0, 3, 4, 7, 100], [9, 10, 11, 12, 13]], jnp.int32)
  start, end = indexer.visible_range(Cached(4), positions)
  want = np.arange(30)[None, None, :] < ((np.asarray(positions) + 1) // 4)[..., None]
  np.testing.assert_array_equal(_mask(start, end, 30), want)


def test_indexer_select_tpu_equals_reference():
  cfg = ModelConfig.preset("tiny")
  ix = Indexer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  seg = np.array([[0] * 19 + [1] * 45], np.int32)
  S = seg.shape[1]
  x = jnp.asarray(rng.standard_normal((1, S, cfg.hidden_size)), jnp.float32)
  qr = jnp.asarray(rng.standard_normal((1, S, cfg.q_lora_rank)), jnp.float32)
  ctx = context.make_context(cfg, jnp.zeros((1, S), jnp.int32), segment_ids=seg)
  out = {}
  for impl in ("reference", "tpu"):
    ix.cfg = dataclasses.replace(cfg, attention_impl=impl)
    out[impl] = nnx.jit(lambda m, x, qr, ctx: m.select(x, qr, ctx, offset=S))(ix, x, qr, ctx)
  (ri, rv), (ti, tv) = out["reference"], out["tpu"]
  assert ri.shape == (1, S, min(cfg.index_topk, S // 4))
  np.testing.assert_array_equal(np.asarray(ti), np.asarray(ri))
  found = np.asarray(ri) >= 0
  np.testing.assert_allclose(np.asarray(tv)[found], np.asarray(rv)[found], rtol=1e-5, atol=1e-5)
  assert np.all(np.isneginf(np.asarray(tv)[~found]))


@pytest.mark.parametrize("attention_impl,topk,head_dim,heads,want", [
    ("gpu", 512, 128, 64, "gpu"),  # V4's indexer shape: the GPU score kernel
    ("gpu", 4096, 128, 64, "gpu"),  # any top-k: the GPU path selects as the reference does
    ("gpu", 512, 96, 64, "reference"),  # a head dim the GPU kernel does not take
    ("gpu", 512, 128, 512, "reference"),  # more heads than it takes
    ("tpu", 512, 128, 64, "tpu"),
    ("tpu", 100_000, 128, 64, "reference"),  # past the TPU kernel's top-k
    ("reference", 512, 128, 64, "reference")])
def test_indexer_implementation_per_attention_impl(attention_impl, topk, head_dim, heads, want):
  cfg = dataclasses.replace(ModelConfig.preset("tiny"), attention_impl=attention_impl)
  assert indexer.implementation(cfg, topk, head_dim, heads) == want


@pytest.mark.parametrize("impl,sized_here", [("reference", True), ("tpu", True), ("gpu", False), ("auto", False)])
def test_query_chunks_sized_by_the_model_only_for_the_reference_layout(monkeypatch, impl, sized_here):
  """The model sizes query chunks for the reference's [C, H, N] tensor; the GPU path ("gpu", and "auto" which
  may resolve to it) gets none and sizes its own [C, N] chunks (else H times more launches)."""
  seen = []

  def fake(q, k, w, end, *, visible_start, topk, implementation, query_chunk):
    seen.append(query_chunk)
    B, S = q.shape[:2]
    return jnp.zeros((B, S, topk), jnp.int32), jnp.zeros((B, S, topk), jnp.float32)

  monkeypatch.setattr(indexer.pallas_kernels, "indexer_topk", fake)
  seg = jnp.zeros((1, 64), jnp.int32)
  layout = context.block_layout(context.document_positions(seg), seg, 4)
  indexer.select_topk_with_scores(jnp.zeros((1, 64, 8, 16)), jnp.zeros((1, 16, 16)), jnp.zeros((1, 64, 8)),
                                  layout, seg, 4, offset=0, impl=impl)
  assert len(seen) == 1 and (seen[0] is not None) == sized_here
