"""Tests for pallas_kernels.indexer_topk.radix_select: radix select gives lax.top_k's result bit for bit
(indices, order, scores), on random scores, heavy ties, signed zeros, rows with few or no visible entries and
k = N, at every digit width; the op's reference with it as the selection equals the default."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.indexer_topk import causal_visible_end
from pallas_kernels.indexer_topk.radix_select import order_keys, radix_top_visible
from pallas_kernels.indexer_topk.reference import indexer_topk_reference, top_visible


def _assert_same(scores, visible, k, bits):
  want = top_visible(jnp.asarray(scores), jnp.asarray(visible), k)
  got = radix_top_visible(jnp.asarray(scores), jnp.asarray(visible), k, bits)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 300), k_frac=st.floats(0.0, 1.0), bits=st.sampled_from([1, 2, 4, 8]),
       pattern=st.sampled_from(["normal", "ties", "signed_zeros", "causal", "none_visible"]), seed=st.integers(0, 99))
def test_radix_select_equals_top_k(rows, n, k_frac, bits, pattern, seed):
  rng = np.random.default_rng(seed)
  k = max(1, int(round(k_frac * n)))
  scores = rng.normal(size=(1, rows, n)).astype(np.float32)
  visible = rng.random((1, rows, n)) < 0.7
  if pattern == "ties":
    scores = rng.integers(-2, 3, size=scores.shape).astype(np.float32)
  elif pattern == "signed_zeros":  # -0.0 ranks below +0.0 in top_k's total order
    scores = np.where(rng.random(scores.shape) < 0.5, np.float32(-0.0), np.float32(0.0))
    scores[..., ::3] = 1.0
  elif pattern == "causal":
    visible = np.arange(n)[None, None, :] < rng.integers(0, n + 1, size=(1, rows, 1))
  elif pattern == "none_visible":
    visible[:, 0] = False
  _assert_same(scores, visible, k, bits)


def test_order_keys_follow_the_float_order():
  values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
  keys = np.asarray(order_keys(jnp.asarray(values), jnp.ones(values.shape, bool)))
  assert np.all(np.diff(keys.astype(np.int64)) > 0)
  assert np.asarray(order_keys(jnp.asarray(values), jnp.zeros(values.shape, bool))).max() == 0
  assert keys.min() > 0  # an invisible entry's key 0 is below every score's, -inf included


@pytest.mark.parametrize("bits", [3, 0, 16])
def test_radix_select_rejects_bad_bits(bits):
  with pytest.raises(ValueError, match="bits must"):
    radix_top_visible(jnp.zeros((1, 2, 8)), jnp.ones((1, 2, 8), bool), 4, bits)


@pytest.mark.parametrize("k", [0, 9])
def test_radix_select_rejects_k_outside_1_to_n(k):
  with pytest.raises(ValueError, match="k must be"):
    radix_top_visible(jnp.zeros((1, 2, 8)), jnp.ones((1, 2, 8), bool), k)


def test_reference_op_with_radix_selection_equals_default():
  B, S, H, D, m, topk = 2, 96, 4, 16, 4, 10
  kq, kk, kw = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (B, S, H, D), jnp.float32)
  k = jax.random.normal(kk, (B, S // m, D), jnp.float32)
  w = jax.random.normal(kw, (B, S, H), jnp.float32)
  end = causal_visible_end(jnp.broadcast_to(jnp.arange(S), (B, S)), m)
  start = jnp.where(jnp.arange(S) >= S // 2, S // 2 // m, 0)[None].repeat(B, 0).astype(jnp.int32)
  want = indexer_topk_reference(q, k, w, start, end, topk=topk, query_chunk=32)
  got = indexer_topk_reference(q, k, w, start, end, topk=topk, query_chunk=32,
                               select=functools.partial(radix_top_visible, bits=4))
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  assert (np.asarray(want[0]) == -1).any() and (np.asarray(want[0]) >= 0).any()
