"""Tests for pallas_kernels.sparse_attention (reference op): a dense masked softmax with the sink (allowed in a
test) is the oracle for outputs, lse and gradients, over drawn shapes and index patterns."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels
from pallas_kernels.sparse_attention.reference import sparse_attention_reference

SCALE = 0.3


def dense_attention(q_BSHD, kv_BTD, sink_H, indices_BSK, scale=SCALE):
  """Softmax over the masked [S, T] score matrix with the sink as one extra logit that has no value."""
  T = kv_BTD.shape[1]
  mask_BST = jnp.any(indices_BSK[..., None] == jnp.arange(T), axis=2)
  s_BSHT = jnp.einsum("BSHD,BTD->BSHT", q_BSHD, kv_BTD) * scale
  s_BSHT = jnp.where(mask_BST[:, :, None, :], s_BSHT, -jnp.inf)
  sink_BSH1 = jnp.broadcast_to(sink_H[:, None], s_BSHT.shape[:-1] + (1,))
  lse_BSH = jax.nn.logsumexp(jnp.concatenate([s_BSHT, sink_BSH1], axis=-1), axis=-1)
  out = jnp.einsum("BSHT,BTD->BSHD", jnp.exp(s_BSHT - lse_BSH[..., None]), kv_BTD)
  return out, lse_BSH


@functools.partial(jax.jit, static_argnames=("query_chunk",))
def reference(q, kv, sink, idx, query_chunk=256):
  return sparse_attention_reference(q, kv, sink, idx, scale=SCALE, query_chunk=query_chunk)


def _loss(fn, q, kv, sink, idx, w_out, w_lse):
  out, lse = fn(q, kv, sink, idx)
  return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)


@functools.partial(jax.jit, static_argnames=("fn",))
def grads(fn, q, kv, sink, idx, w_out, w_lse):
  return jax.grad(_loss, argnums=(1, 2, 3))(fn, q, kv, sink, idx, w_out, w_lse)


dense_jit = jax.jit(dense_attention)


def _ref_fn(query_chunk):
  return functools.partial(sparse_attention_reference, scale=SCALE, query_chunk=query_chunk)


REF_256, REF_4 = _ref_fn(256), _ref_fn(4)


def make_indices(rng, pattern, B, S, T, K):
  """[B, S, K] int32 index lists, distinct within a row, -1 = none."""
  if pattern == "all_masked":
    return np.full((B, S, K), -1, np.int32)
  if pattern == "window":  # causal window over raw tokens, as context.window_indices builds it (T = S)
    t, w = np.arange(S)[:, None], np.arange(K)[None]
    j = t - K + 1 + w
    return np.broadcast_to(np.where(j >= 0, j, -1), (B, S, K)).astype(np.int32)
  if pattern == "shared":  # every query selects the same entries (duplicates across queries)
    row = rng.permutation(T)[:K]
    row = np.where(np.arange(K) < max(1, K - 1), row, -1) if K <= T else np.pad(row, (0, K - len(row)),
                                                                                 constant_values=-1)
    return np.broadcast_to(row, (B, S, K)).astype(np.int32)
  out = np.full((B, S, K), -1, np.int32)  # "random": distinct picks per row, some rows partly or fully empty
  for b in range(B):
    for s in range(S):
      n = rng.integers(0, min(K, T) + 1)
      out[b, s, rng.permutation(K)[:n]] = rng.permutation(T)[:n]
  return out


def inputs(seed, B, S, H, D, T, K, pattern):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, S, H, D)).astype(np.float32)
  kv = rng.standard_normal((B, T, D)).astype(np.float32)
  sink = rng.standard_normal(H).astype(np.float32)
  idx = make_indices(rng, pattern, B, S, T, K)
  return tuple(map(jnp.asarray, (q, kv, sink, idx)))


def assert_close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# A few shapes (each one compiles four functions); the index patterns and values vary freely.
SHAPES = [(1, 5, 1, 8, 9, 4), (2, 9, 3, 16, 16, 7), (1, 1, 2, 8, 3, 1)]  # B, S, H, D, T, K


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES),
       pattern=st.sampled_from(["random", "window", "shared", "all_masked"]))
def test_matches_dense(seed, shape, pattern):
  B, S, H, D, T, K = shape
  if pattern == "window":
    T = S
  q, kv, sink, idx = inputs(seed, B, S, H, D, T, K, pattern)
  out, lse = reference(q, kv, sink, idx)
  want_out, want_lse = dense_jit(q, kv, sink, idx)
  assert out.shape == q.shape and lse.shape == (B, S, H) and lse.dtype == jnp.float32
  assert_close(out, want_out)
  assert_close(lse, want_lse)
  w_out = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(q.shape), jnp.float32)
  w_lse = jnp.asarray(np.random.default_rng(seed + 2).standard_normal(lse.shape), jnp.float32)
  got_g = grads(REF_256, q, kv, sink, idx, w_out, w_lse)
  want_g = grads(dense_attention, q, kv, sink, idx, w_out, w_lse)
  for g, w in zip(got_g, want_g):
    assert np.all(np.isfinite(np.asarray(g)))
    assert_close(g, w, 5e-5)


def test_lse_includes_sink_and_sink_has_no_value():
  """One visible key with score s: out = kv · σ(s − sink), lse = log(e^s + e^sink)."""
  q, kv = jnp.ones((1, 1, 1, 4)), jnp.full((1, 2, 4), 0.5)
  sink = jnp.array([0.7])
  idx = jnp.array([[[1, -1]]], jnp.int32)
  out, lse = reference(q, kv, sink, idx)
  s = SCALE * 4 * 0.5
  np.testing.assert_allclose(np.asarray(lse)[0, 0, 0], np.log(np.exp(s) + np.exp(0.7)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], 0.5 / (1 + np.exp(0.7 - s)), rtol=1e-6)


def test_all_masked_rows():
  q, kv, sink, _ = inputs(0, 2, 6, 3, 8, 5, 4, "random")
  idx = jnp.asarray(make_indices(np.random.default_rng(1), "random", 2, 6, 5, 4)).at[:, 2].set(-1)
  out, lse = reference(q, kv, sink, idx)
  np.testing.assert_array_equal(np.asarray(out)[:, 2], 0.0)
  np.testing.assert_array_equal(np.asarray(lse)[:, 2], np.broadcast_to(np.asarray(sink), (2, 3)))
  w_out, w_lse = jnp.ones_like(q), jnp.ones(lse.shape)
  dq, dkv, dsink = grads(REF_256, q, kv, sink, idx, w_out, w_lse)
  for g in (dq, dkv, dsink):
    assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_array_equal(np.asarray(dq)[:, 2], 0.0)


@pytest.mark.parametrize("pattern", ["random", "window", "all_masked"])
def test_chunked_equals_unchunked(pattern):
  S = 11  # 3 chunks of 4, the last one padded
  q, kv, sink, idx = inputs(3, 2, S, 2, 8, S, 5, pattern)
  for a, b in zip(reference(q, kv, sink, idx, query_chunk=4), reference(q, kv, sink, idx)):
    assert_close(a, b, 1e-6)
  w_out = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
  w_lse = jnp.ones((2, S, 2))
  for a, b in zip(grads(REF_4, q, kv, sink, idx, w_out, w_lse), grads(REF_256, q, kv, sink, idx, w_out, w_lse)):
    assert_close(a, b, 1e-5)


def test_duplicate_index_in_a_row_counts_twice():
  """A gather kernel (as the official one) sees a repeated index as two keys: logit s + log 2."""
  q, kv, sink, _ = inputs(5, 1, 1, 2, 8, 3, 3, "random")
  out, lse = reference(q, kv, sink, jnp.array([[[0, 0, 2]]], jnp.int32))
  s = np.einsum("hd,td->ht", np.asarray(q)[0, 0], np.asarray(kv)[0]) * SCALE
  logits = np.stack([s[:, 0] + np.log(2), s[:, 2], np.asarray(sink)], -1)
  np.testing.assert_allclose(np.asarray(lse)[0, 0], np.log(np.exp(logits).sum(-1)), rtol=1e-5)


def test_bfloat16_inputs():
  q, kv, sink, idx = inputs(6, 1, 4, 2, 8, 4, 4, "window")
  out, lse = reference(q.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), sink, idx)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  assert_close(out.astype(jnp.float32), dense_jit(q, kv, sink, idx)[0], 3e-2)


def test_entry_point_validates():
  q, kv, sink, idx = inputs(7, 1, 3, 2, 8, 3, 2, "random")
  out, lse = pallas_kernels.sparse_attention(q, kv, sink, idx, scale=SCALE, implementation="reference")
  assert_close(out, reference(q, kv, sink, idx)[0], 0)
  with pytest.raises(ValueError, match="implementation"):
    pallas_kernels.sparse_attention(q, kv, sink, idx, scale=SCALE, implementation="cuda")
  with pytest.raises(ValueError, match="sink"):
    pallas_kernels.sparse_attention(q, kv, sink[:1], idx, scale=SCALE)
  with pytest.raises(ValueError, match="mismatch"):
    pallas_kernels.sparse_attention(q, kv[..., :4], sink, idx, scale=SCALE)
