"""Tests for pallas_kernels.indexer_topk (reference op and the shared backward): brute-force numpy selection
(float64 scores, explicit (score desc, index asc) order) for indices and scores; ties; fewer visible entries
than k; topk > N; packed-document ranges; gradients of the selected scores against jax.grad of a dense
formulation (every [S, N] score, then the picked ones)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels
from pallas_kernels.indexer_topk import causal_visible_end
from pallas_kernels.indexer_topk.reference import index_scores
from pallas_kernels.indexer_topk.vjp import indexer_topk_bwd


def numpy_topk(q, k, w, start, end, topk):
  """(indices, scores) by brute force: float64 scores, visible range, a stable lexicographic order."""
  B, S = q.shape[:2]
  N = k.shape[1]
  logits = np.einsum("bshd,bnd->bshn", q.astype(np.float64), k.astype(np.float64))
  scores = np.einsum("bshn,bsh->bsn", np.maximum(logits, 0), w.astype(np.float64))
  idx = np.full((B, S, topk), -1, np.int64)
  val = np.full((B, S, topk), -np.inf)
  for b in range(B):
    for t in range(S):
      vis = np.arange(max(start[b, t], 0), min(end[b, t], N))
      order = vis[np.lexsort((vis, -scores[b, t, vis]))][:topk]
      idx[b, t, :len(order)] = order
      val[b, t, :len(order)] = scores[b, t, order]
  return idx, val


def make_inputs(seed, B, S, H, D, N, dtype=jnp.float32, integer=False):
  """q, k, w; `integer`: small integers (exact scores in float32, many ties)."""
  rng = np.random.default_rng(seed)
  draw = (lambda s: rng.integers(-2, 3, s).astype(np.float32)) if integer else rng.standard_normal
  q, k, w = draw((B, S, H, D)), draw((B, N, D)), draw((B, S, H))
  return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(w, dtype)


def make_ranges(seed, B, S, N, pattern):
  """(visible_start, visible_end) [B, S] int32."""
  rng = np.random.default_rng(seed)
  if pattern == "causal":  # positions 0.. with ratio 4, plus a decode-like offset on row 1
    pos = np.arange(S)[None].repeat(B, 0) + (np.arange(B) * 5)[:, None]
    return np.zeros((B, S), np.int32), np.asarray(causal_visible_end(jnp.asarray(pos), 4))
  if pattern == "packed":  # two documents: the second's entries start at N // 2
    end = np.minimum(np.arange(1, S + 1) // 4, N)[None].repeat(B, 0)
    start = np.zeros_like(end)
    half = S // 2
    start[:, half:], end[:, half:] = N // 2, np.minimum(N // 2 + (np.arange(S - half) + 1) // 4, N)
    return start.astype(np.int32), end.astype(np.int32)
  if pattern == "none":
    return np.zeros((B, S), np.int32), np.zeros((B, S), np.int32)
  start = rng.integers(0, N + 1, (B, S))
  return start.astype(np.int32), (start + rng.integers(0, N + 1, (B, S))).astype(np.int32)


def check_selection(got_idx, got_val, want_idx, want_val, rtol):
  got_idx, got_val = np.asarray(got_idx), np.asarray(got_val, np.float64)
  np.testing.assert_array_equal(got_idx, want_idx)
  assert np.all(np.isneginf(got_val) == (want_idx < 0))
  found = want_idx >= 0
  scale = np.abs(want_val[found]).max(initial=1.0)
  np.testing.assert_allclose(got_val[found], want_val[found], rtol=rtol, atol=rtol * scale)


op = jax.jit(pallas_kernels.indexer_topk, static_argnames=("topk", "implementation", "query_chunk"))


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), S=st.integers(1, 40), H=st.integers(1, 4), N=st.integers(1, 50),
       topk=st.integers(1, 12), pattern=st.sampled_from(["causal", "packed", "random", "none"]),
       chunk=st.sampled_from([None, 3]), seed=st.integers(0, 2**16))
def test_reference_equals_brute_force(B, S, H, N, topk, pattern, chunk, seed):
  q, k, w = make_inputs(seed, B, S, H, 8, N, integer=True)  # exact scores: ties resolved by index
  start, end = make_ranges(seed, B, S, N, pattern)
  idx, val = op(q, k, w, jnp.asarray(end), visible_start=jnp.asarray(start), topk=topk,
                implementation="reference", query_chunk=chunk)
  want = numpy_topk(np.asarray(q), np.asarray(k), np.asarray(w), start, end, topk)
  assert idx.shape == val.shape == (B, S, topk) and idx.dtype == jnp.int32 and val.dtype == jnp.float32
  check_selection(idx, val, *want, rtol=0)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-5)])
def test_reference_random_scores(dtype, rtol):
  B, S, H, D, N, K = 2, 37, 4, 16, 30, 7
  q, k, w = make_inputs(1, B, S, H, D, N, dtype)
  start, end = make_ranges(1, B, S, N, "random")
  idx, val = op(q, k, w, jnp.asarray(end), visible_start=jnp.asarray(start), topk=K, implementation="reference")
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32))  # bf16 inputs are exact in float64
  check_selection(idx, val, *numpy_topk(f64(q), f64(k), f64(w), start, end, K), rtol=rtol)


def test_fewer_visible_and_topk_above_n():
  q, k, w = make_inputs(2, 1, 12, 2, 8, 3)
  end = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3]], jnp.int32)
  idx, val = pallas_kernels.indexer_topk(q, k, w, end, topk=5, implementation="reference")
  idx = np.asarray(idx)
  assert idx.shape == (1, 12, 5)
  np.testing.assert_array_equal((idx >= 0).sum(-1), np.asarray(end))
  assert np.all(np.isneginf(np.asarray(val)[idx < 0]))


def test_empty():
  q, k, w = make_inputs(3, 1, 4, 2, 8, 0)
  idx, val = pallas_kernels.indexer_topk(q, k, w, jnp.ones((1, 4), jnp.int32), topk=3)
  assert idx.shape == (1, 4, 3) and np.all(np.asarray(idx) == -1) and np.all(np.isneginf(np.asarray(val)))


def test_bad_input_is_named():
  q, k, w = make_inputs(4, 1, 4, 2, 8, 5)
  end = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="w must be"):
    pallas_kernels.indexer_topk(q, k, w[:, :, :1], end, topk=2)
  with pytest.raises(ValueError, match="visible_end"):
    pallas_kernels.indexer_topk(q, k, w, end[:, :3], topk=2)
  with pytest.raises(ValueError, match="implementation"):
    pallas_kernels.indexer_topk(q, k, w, end, topk=2, implementation="cuda")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      pallas_kernels.indexer_topk(q, k, w, end, topk=2, implementation="gpu")
  with pytest.raises(ValueError, match="TPU kernel"):
    pallas_kernels.indexer_topk(q, k, w, end, topk=4096, implementation="tpu")


def dense_picked_scores(q, k, w, idx):
  """Every [S, N] score, then the picked ones (-inf where -1): differentiable by plain autodiff."""
  scores = index_scores(q, k, w)
  picked = jnp.take_along_axis(scores, jnp.maximum(idx, 0), axis=-1)
  return jnp.where(idx >= 0, picked, -jnp.inf)


def _loss_op(q, k, w, end, start, g, implementation):
  _, val = pallas_kernels.indexer_topk(q, k, w, end, visible_start=start, topk=g.shape[-1],
                                       implementation=implementation)
  return jnp.sum(jnp.where(jnp.isfinite(val), val * g, 0.0))


def _loss_dense(q, k, w, idx, g):
  val = dense_picked_scores(q, k, w, idx)
  return jnp.sum(jnp.where(jnp.isfinite(val), val * g, 0.0))


@functools.partial(jax.jit, static_argnames="implementation")
def grads_op(q, k, w, end, start, g, implementation="reference"):
  return jax.grad(_loss_op, argnums=(0, 1, 2))(q, k, w, end, start, g, implementation)


grads_dense = jax.jit(jax.grad(_loss_dense, argnums=(0, 1, 2)))


def check_close(got, want, rel):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * max(np.abs(want).max(), 1e-3))


@settings(max_examples=6, deadline=None)
@given(S=st.integers(1, 30), H=st.integers(1, 3), N=st.integers(1, 20), topk=st.integers(1, 8),
       pattern=st.sampled_from(["causal", "packed", "random"]), seed=st.integers(0, 2**16))
def test_gradients_match_dense_autodiff(S, H, N, topk, pattern, seed):
  q, k, w = make_inputs(seed, 2, S, H, 8, N)
  start, end = (jnp.asarray(a) for a in make_ranges(seed, 2, S, N, pattern))
  g = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((2, S, topk)), jnp.float32)
  idx, _ = op(q, k, w, end, visible_start=start, topk=topk, implementation="reference")
  for got, want in zip(grads_op(q, k, w, end, start, g), grads_dense(q, k, w, idx, g)):
    check_close(got, want, 1e-5)


def test_backward_chunks_agree():
  """The backward's query chunks (scan, padded last chunk, scatter-add of dk) give the one-chunk result."""
  q, k, w = make_inputs(5, 2, 23, 3, 8, 11)
  start, end = (jnp.asarray(a) for a in make_ranges(5, 2, 23, 11, "random"))
  idx, _ = op(q, k, w, end, visible_start=start, topk=4, implementation="reference")
  ds = jnp.asarray(np.random.default_rng(6).standard_normal(idx.shape), jnp.float32)
  whole = indexer_topk_bwd(q, k, w, idx, ds, query_chunk=23)
  for got, want in zip(indexer_topk_bwd(q, k, w, idx, ds, query_chunk=5), whole):
    check_close(got, want, 1e-6)
