"""Tests for dsv4_jax.model.indexer (spec §6): scores Σ_h w·relu(q·k), top-k over visible entries only, chunked
scoring, and the whole indexer against numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.model import context, indexer
from dsv4_jax.model.indexer import Indexer

CFG = ModelConfig.preset("tiny")


def scores_np(q_SHK, k_NK, w_SH):
  logits = np.einsum("shk,nk->shn", q_SHK.astype(np.float64), k_NK.astype(np.float64))
  return np.einsum("shn,sh->sn", np.maximum(logits, 0), w_SH.astype(np.float64))


def check_topk(idx_SK, scores_SN, visible_SN, topk, offset):
  """Valid picks are distinct visible entries holding the best min(topk, #visible) scores; the rest are -1."""
  for t in range(idx_SK.shape[0]):
    row = idx_SK[t]
    picks = row[row >= 0] - offset
    assert np.all(row[row < 0] == -1)
    n_vis = int(visible_SN[t].sum())
    assert len(picks) == min(topk, n_vis), t
    assert len(set(picks.tolist())) == len(picks)
    assert visible_SN[t, picks].all()
    best = np.sort(scores_SN[t][visible_SN[t]])[::-1][:len(picks)]
    np.testing.assert_allclose(np.sort(scores_SN[t, picks])[::-1], best, rtol=1e-5, atol=1e-6)


def random(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def layout_for(segment):
  positions = context.document_positions(jnp.asarray(segment))
  return context.block_layout(positions, jnp.asarray(segment), 4)


def test_index_scores_formula():
  q, k, w = random((1, 6, 3, 8), 0), random((1, 5, 8), 1), random((1, 6, 3), 2)
  got = np.asarray(indexer.index_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w)))
  np.testing.assert_allclose(got[0], scores_np(q[0], k[0], w[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("segment", [[0] * 37, [0] * 13 + [1] * 6 + [2] * 18])
@pytest.mark.parametrize("topk", [3, 9])
def test_select_topk_visible_only(segment, topk):
  seg = np.array([segment], np.int32)
  S = seg.shape[1]
  layout = layout_for(seg)
  N = S // 4
  q, k, w = random((1, S, 3, 8), 3), random((1, N, 8), 4), random((1, S, 3), 5)
  idx = np.asarray(indexer.select_topk(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w), layout, jnp.asarray(seg),
                                       topk, offset=S))
  assert idx.shape == (1, S, topk)
  vis = np.asarray(layout.visible_BCN(jnp.arange(S, dtype=jnp.int32), jnp.asarray(seg)))[0]
  check_topk(idx[0], scores_np(q[0], k[0], w[0]), vis, topk, S)


def test_chunked_scoring_equals_whole(monkeypatch):
  seg = np.array([[0] * 21 + [1] * 22], np.int32)
  S, N, H = 43, 10, 3
  layout = layout_for(seg)
  args = (jnp.asarray(random((1, S, H, 8), 6)), jnp.asarray(random((1, N, 8), 7)),
          jnp.asarray(random((1, S, H), 8)), layout, jnp.asarray(seg), 4)
  whole = np.asarray(indexer.select_topk(*args, offset=S))
  monkeypatch.setattr(indexer, "_SCORE_BUDGET", 5 * H * N)  # 5-query chunks, the last one padded
  chunked = np.asarray(indexer.select_topk(*args, offset=S))
  np.testing.assert_array_equal(np.sort(chunked, -1), np.sort(whole, -1))


def test_no_entries_gives_empty_selection():
  seg = np.zeros((1, 3), np.int32)
  out = indexer.select_topk(jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 0, 8)), jnp.zeros((1, 3, 2)), layout_for(seg),
                            jnp.asarray(seg), 4, offset=3)
  assert out.shape == (1, 3, 0)


def test_indexer_matches_numpy(np_ref):
  ix = Indexer(CFG, rngs=nnx.Rngs(0))
  ix.compressor.norm.weight[...] = jnp.asarray(1 + 0.3 * random((CFG.index_head_dim,), 9))
  seg = np.array([[0] * 19 + [1] * 45], np.int32)
  S = seg.shape[1]
  x, qr = random((1, S, CFG.hidden_size), 10), random((1, S, CFG.q_lora_rank), 11)
  ctx = context.make_context(CFG, jnp.zeros((1, S), jnp.int32), segment_ids=seg)
  idx = np.asarray(nnx.jit(lambda m, x, qr, ctx: m(x, qr, ctx, offset=S))(ix, jnp.asarray(x), jnp.asarray(qr), ctx))
  topk = min(CFG.index_topk, S // 4)
  assert idx.shape == (1, S, topk)
  # Queries: c_Q @ wq_b, RoPE (YaRN table) at the in-document position; keys: the indexer's own compressor.
  q = np.einsum("sq,qhc->shc", qr[0].astype(np.float64), np.asarray(ix.wq_b[...], np.float64))
  q = np_ref.rotate(q, np.asarray(ctx.positions_BS)[0], np_ref.layer_freqs(CFG, compressed=True))
  k = np.asarray(ix.compressor(jnp.asarray(x), ctx.positions_BS, ctx.layouts[4]))[0]
  w = x[0].astype(np.float64) @ np.asarray(ix.weights_proj[...], np.float64)
  w *= CFG.index_head_dim ** -0.5 * CFG.index_n_heads ** -0.5
  vis = np.asarray(ctx.layouts[4].visible_BCN(jnp.arange(S, dtype=jnp.int32), jnp.asarray(seg)))[0]
  check_topk(idx[0], scores_np(q, k, w), vis, topk, S)
  # Some query sees more entries than it may pick, so the selection is a real top-k.
  assert vis.sum(-1).max() > topk
