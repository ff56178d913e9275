"""Tests for dsv4_jax.model.context: document positions, sliding windows and compressed-block visibility
(i < floor((t+1)/m), spec §5.3), with and without packed documents, against direct formulas."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4_jax.config import ModelConfig
from dsv4_jax.model import context, rope

_layout = jax.jit(context.block_layout, static_argnums=2)
_windows = jax.jit(context.window_indices, static_argnums=1)
_positions = jax.jit(context.document_positions)


def segments_from_lengths(lengths):
  return np.concatenate([np.full(n, d, np.int32) for d, n in enumerate(lengths)])[None]


def docs(segment_S):
  """[(start, length)] of the contiguous documents of one row."""
  out, start = [], 0
  for t in range(1, len(segment_S) + 1):
    if t == len(segment_S) or segment_S[t] != segment_S[t - 1]:
      out.append((start, t - start))
      start = t
  return out


def doc_lengths(total, max_docs=4):
  """Document lengths summing to `total`."""
  return st.lists(st.integers(1, total - 1), max_size=max_docs - 1, unique=True).map(
      lambda cuts: np.diff([0] + sorted(cuts) + [total]).tolist())


def visible(layout, segment_BS):
  S = segment_BS.shape[1]
  return np.asarray(layout.visible_BCN(np.arange(S, dtype=np.int32), segment_BS))


# ---------------------------------------------------------------------------------------------------------------
# Single document.
@pytest.mark.parametrize("m, S", [(4, 37), (4, 40), (128, 300), (128, 256)])
def test_block_visibility_formula(m, S):
  seg = np.zeros((1, S), np.int32)
  layout = _layout(_positions(seg), seg, m)
  t, i = np.arange(S)[:, None], np.arange(S // m)[None, :]
  np.testing.assert_array_equal(visible(layout, seg)[0], i < (t + 1) // m)
  np.testing.assert_array_equal(np.asarray(layout.valid_BN[0]), True)
  np.testing.assert_array_equal(np.asarray(layout.end_BN[0]), (np.arange(S // m) + 1) * m - 1)
  np.testing.assert_array_equal(np.asarray(layout.block_BN[0]), np.arange(S // m))
  offset = 1000
  idx = np.asarray(layout.visible_indices_BSN(seg, offset))[0]
  np.testing.assert_array_equal(idx, np.where(i < (t + 1) // m, i + offset, -1))


def test_window_single_document():
  S, W = 40, 16
  got = np.asarray(_windows(np.zeros((1, S), np.int32), W))[0]
  for t in range(S):
    want = [j if j >= 0 else -1 for j in range(t - W + 1, t + 1)]
    assert got[t].tolist() == want


# ---------------------------------------------------------------------------------------------------------------
# Packed documents.
def check_packed_layout(lengths, m):
  seg = segments_from_lengths(lengths)
  S = seg.shape[1]
  pos = np.asarray(_positions(seg))[0]
  layout = _layout(pos[None], seg, m)
  # Slots: exactly the complete blocks of every document, in order; blocks restart at each document start.
  want = [(d, i, s0 + (i + 1) * m - 1) for d, (s0, n) in enumerate(docs(seg[0])) for i in range(n // m)]
  valid = np.asarray(layout.valid_BN[0])
  assert valid.sum() == len(want) and valid[:len(want)].all()
  got = list(zip(np.asarray(layout.segment_BN[0])[valid].tolist(), np.asarray(layout.block_BN[0])[valid].tolist(),
                 np.asarray(layout.end_BN[0])[valid].tolist()))
  assert got == want
  # Visibility: query t (position p in document d) sees block (d', i) iff d' = d and i < floor((p + 1) / m).
  vis = visible(layout, seg)[0]
  assert not vis[:, ~valid].any()
  for t in range(S):
    seen = {(d, i) for (d, i, _), v in zip(want, vis[t, :len(want)]) if v}
    assert seen == {(seg[0, t], i) for i in range((pos[t] + 1) // m)}, t
  idx = np.asarray(layout.visible_indices_BSN(seg, 7))[0]
  np.testing.assert_array_equal(idx, np.where(vis, np.arange(vis.shape[1])[None] + 7, -1))


def check_packed_window(lengths, W):
  seg = segments_from_lengths(lengths)
  S = seg.shape[1]
  got = np.asarray(_windows(seg, W))[0]
  for t in range(S):
    want = {j for j in range(max(0, t - W + 1), t + 1) if seg[0, j] == seg[0, t]}
    row = got[t]
    assert set(row[row >= 0].tolist()) == want
    for w, j in enumerate(row):  # slot w holds token t - W + 1 + w or nothing
      assert j in (-1, t - W + 1 + w)


@settings(max_examples=25, deadline=None)
@given(lengths=doc_lengths(41))
def test_packed_documents_csa(lengths):
  check_packed_layout(lengths, 4)
  check_packed_window(lengths, 16)


@pytest.mark.parametrize("lengths", [[130, 300, 6], [127, 129, 256], [5, 390]])
def test_packed_documents_hca(lengths):
  check_packed_layout(lengths, 128)


@settings(max_examples=25, deadline=None)
@given(lengths=doc_lengths(30))
def test_document_positions(lengths):
  seg = segments_from_lengths(lengths)
  np.testing.assert_array_equal(np.asarray(_positions(seg))[0], np.concatenate([np.arange(n) for n in lengths]))


def test_batch_rows_are_independent():
  seg = np.concatenate([segments_from_lengths([9, 11]), segments_from_lengths([20])])
  layout = _layout(_positions(seg), seg, 4)
  for b in range(2):
    one = _layout(_positions(seg[b:b + 1]), seg[b:b + 1], 4)
    np.testing.assert_array_equal(visible(layout, seg)[b], visible(one, seg[b:b + 1])[0])


def test_make_context_restarts_positions_and_tables():
  cfg = ModelConfig.preset("tiny")
  seg = segments_from_lengths([10, 14])
  tokens = np.zeros_like(seg)
  ctx = context.make_context(cfg, tokens, segment_ids=seg)
  pos = np.concatenate([np.arange(10), np.arange(14)])
  np.testing.assert_array_equal(np.asarray(ctx.positions_BS)[0], pos)
  assert set(ctx.layouts) == {4, 128}
  plain = rope.layer_frequencies(cfg, compressed=False)
  yarn = rope.layer_frequencies(cfg, compressed=True)
  np.testing.assert_allclose(np.asarray(ctx.rope_plain[0])[0], np.cos(pos[:, None] * plain), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ctx.rope_yarn[1])[0], np.sin(pos[:, None] * yarn), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(ctx.window_BSW), np.asarray(_windows(seg, cfg.sliding_window)))
  # Explicit positions win over the document positions.
  ctx = context.make_context(cfg, tokens, segment_ids=seg, positions=np.arange(24)[None] + 3)
  np.testing.assert_array_equal(np.asarray(ctx.positions_BS)[0], np.arange(24) + 3)
