"""indexer_topk.select (sort-free top-k) picks exactly top_visible's entries (lax.top_k, ties to the lower index),
in increasing index order, -1 past the visible ones; on drawn shapes, score patterns full of ties and signed
zeros, any visibility, every digit width; and its prefix sums are exact."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.indexer_topk.reference import top_visible
from pallas_kernels.indexer_topk.select import inclusive_counts, kth_largest, order_keys, select_top_k


def _scores(rng, shape, pattern):
  if pattern == "normal":
    return rng.normal(size=shape).astype(np.float32)
  if pattern == "ties":  # a handful of values: many ties at the k-th score
    return rng.integers(-2, 3, size=shape).astype(np.float32)
  if pattern == "zeros":  # +0.0 / -0.0 mixed with a few tiny positives: lax.top_k treats the zeros as equal
    return (np.where(rng.random(shape) < 0.5, -0.0, 0.0) + (rng.random(shape) < 0.1) * 1e-30).astype(np.float32)
  return (rng.normal(size=shape) * 10.0 ** rng.integers(-30, 30, size=shape)).astype(np.float32)  # wide range


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), C=st.integers(1, 3), N=st.integers(1, 300), k_frac=st.floats(0, 1),
       vis_frac=st.floats(0, 1), pattern=st.sampled_from(["normal", "ties", "zeros", "wide"]),
       bits=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2 ** 16))
def test_same_entries_as_lax_top_k(B, C, N, k_frac, vis_frac, pattern, bits, seed):
  rng = np.random.default_rng(seed)
  k = max(1, round(k_frac * N))
  scores = jnp.asarray(_scores(rng, (B, C, N), pattern))
  visible = jnp.asarray(rng.random((B, C, N)) < vis_frac)
  got = np.asarray(select_top_k(scores, visible, k, bits))
  want = np.asarray(top_visible(scores, visible, k)[0])
  np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))
  n_picked = (got >= 0).sum(-1, keepdims=True)
  np.testing.assert_array_equal(got >= 0, np.arange(k) < n_picked)  # the -1s trail
  picked = np.where(got >= 0, got, np.iinfo(np.int32).max - k + np.arange(k))
  assert (np.diff(picked, axis=-1) > 0).all(), "entries not in increasing index order"


def test_all_hidden_and_k_equals_n():
  scores = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 40)), jnp.float32)
  np.testing.assert_array_equal(select_top_k(scores, jnp.zeros((2, 1, 40), bool), 5), -1)
  np.testing.assert_array_equal(select_top_k(scores, jnp.ones((2, 1, 40), bool), 40),
                                np.broadcast_to(np.arange(40), (2, 1, 40)))


def test_order_keys_follow_the_floats():
  x = np.array([-np.inf, -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3e38, np.inf], np.float32)
  keys = np.asarray(order_keys(jnp.asarray(x), jnp.ones(x.shape, bool))).astype(np.int64)
  assert (np.diff(keys) >= 0).all() and keys[4] == keys[5] and (np.diff(np.delete(keys, 4)) > 0).all()
  assert keys.min() > 0 and int(order_keys(jnp.asarray(x[:1]), jnp.zeros(1, bool))[0]) == 0


@pytest.mark.parametrize("n", [1, 5, 128, 129, 300, 40000])
def test_inclusive_counts_exact(n):
  flags = np.random.default_rng(n).random((3, n)) < 0.7
  np.testing.assert_array_equal(inclusive_counts(jnp.asarray(flags)), np.cumsum(flags, -1))


def test_kth_largest_and_bad_arguments():
  keys = jnp.asarray([[5, 9, 9, 1, 0]], jnp.uint32)
  assert [int(kth_largest(keys, k)[0]) for k in (1, 2, 3, 4, 5)] == [9, 9, 5, 1, 0]
  with pytest.raises(ValueError, match="bits_per_pass"):
    kth_largest(keys, 1, bits_per_pass=3)
  with pytest.raises(ValueError, match="0 < k <= N"):
    select_top_k(jnp.zeros((1, 1, 4)), jnp.ones((1, 1, 4), bool), 5)
