"""Tests for dsv4_jax.model.mhc: Sinkhorn in the official order, mHC pre/post/head against numpy (spec §3.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4_jax.model import mhc

N, D, EPS, NORM_EPS = 4, 16, 1e-6, 1e-6
_sinkhorn = jax.jit(mhc.sinkhorn, static_argnums=(1, 2))


def sinkhorn_np(logits, iters, eps):
  """Official `hc_split_sinkhorn`: row softmax + eps, column-normalize, then (iters-1) × (rows, columns)."""
  x = np.asarray(logits, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  c = e / e.sum(-1, keepdims=True) + eps
  c = c / (c.sum(-2, keepdims=True) + eps)
  for _ in range(iters - 1):
    c = c / (c.sum(-1, keepdims=True) + eps)
    c = c / (c.sum(-2, keepdims=True) + eps)
  return c


def sigmoid_np(x):
  return 1.0 / (1.0 + np.exp(-x))


def mixes_np(h, fn, norm_eps):
  B, S = h.shape[:2]
  xf = np.asarray(h, np.float64).reshape(B, S, -1)
  rsqrt = 1.0 / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + norm_eps)
  return (xf @ np.asarray(fn, np.float64).T) * rsqrt


def hc_pre_np(h, fn, scale, base, iters=20, eps=EPS):
  """Spec §3.2, rows of fn/base ordered [pre(n), post(n), comb(n·n)]."""
  n = h.shape[2]
  mixes = mixes_np(h, fn, NORM_EPS)
  pre = sigmoid_np(mixes[..., :n] * scale[0] + base[:n]) + eps
  post = 2 * sigmoid_np(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
  comb_logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(mixes.shape[:2] + (n, n))
  comb = sinkhorn_np(comb_logits, iters, eps)
  x = np.einsum("bsn,bsnd->bsd", pre, h)
  return x, post, comb


def hc_post_np(x, res, post, comb):
  """h[k] = post[k]·x + Σ_j comb[j, k]·res[j]."""
  out = np.zeros_like(res, dtype=np.float64)
  for k in range(res.shape[2]):
    out[:, :, k] = post[:, :, k, None] * x
    for j in range(res.shape[2]):
      out[:, :, k] += comb[:, :, j, k, None] * res[:, :, j]
  return out


@pytest.fixture(scope="module")
def hc():
  rng = np.random.default_rng(0)
  m = mhc.HyperConnection(N, D, sinkhorn_iters=20, hc_eps=EPS, norm_eps=NORM_EPS, rngs=nnx.Rngs(0))
  m.fn[...] = jnp.asarray(rng.standard_normal(m.fn.shape) * (N * D) ** -0.5 * 2, jnp.float32)
  m.base[...] = jnp.asarray(rng.standard_normal(m.base.shape), jnp.float32)
  m.scale[...] = jnp.asarray([0.7, 1.3, 1.9], jnp.float32)
  return m


def _streams(seed=1, B=2, S=5):
  return np.random.default_rng(seed).standard_normal((B, S, N, D)).astype(np.float32)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.05, 0.75))
def test_sinkhorn_is_doubly_stochastic(seed, scale):
  logits = scale * np.random.default_rng(seed).standard_normal((3, N, N)).astype(np.float32)
  comb = np.asarray(_sinkhorn(jnp.asarray(logits), 20, EPS), np.float64)
  assert np.all(comb > 0)
  np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-5)
  np.testing.assert_allclose(comb.sum(-1), 1.0, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.75, 4.0))
def test_sinkhorn_columns_exact_for_large_logits(seed, scale):
  # 20 iterations do not always converge the rows to 1e-5 for large logits (the official algorithm's own
  # limit, as the numpy reference shows); the last step normalizes columns, so those always sum to 1.
  logits = scale * np.random.default_rng(seed).standard_normal((3, N, N)).astype(np.float32)
  comb = np.asarray(_sinkhorn(jnp.asarray(logits), 20, EPS), np.float64)
  np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-5)
  np.testing.assert_allclose(comb, sinkhorn_np(logits, 20, EPS), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("iters", [1, 2, 3, 20])
def test_sinkhorn_matches_official_order(iters):
  # Few iterations tell the orders apart (rows first, columns last; softmax + eps start).
  logits = 2 * np.random.default_rng(iters).standard_normal((2, 3, N, N)).astype(np.float32)
  got = np.asarray(mhc.sinkhorn(jnp.asarray(logits), iters, EPS))
  np.testing.assert_allclose(got, sinkhorn_np(logits, iters, EPS), rtol=1e-5, atol=1e-6)


def sinkhorn_loop(logits, iters, eps):
  """Independent jnp reference: softmax + reductions over the n axes inside a fori_loop (the pre-unrolled form)."""
  c = jax.nn.softmax(logits, axis=-1) + eps
  c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  def body(_, c):
    c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
    return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  return jax.lax.fori_loop(0, iters - 1, body, c)


_SHAPES = [(N, N), (3, N, N), (2, 5, N, N), (6, 3, 3), (2, 1, 2, 2)]


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("iters", [1, 2, 7, 20])
def test_sinkhorn_unrolled_equals_loop(shape, iters):
  # f32 vs f32: only the summation order and division-as-reciprocal differ (measured ≤ 1.1e-6 relative).
  x = 2.5 * np.random.default_rng(iters * 31 + len(shape)).standard_normal(shape).astype(np.float32)
  got = np.asarray(_sinkhorn(jnp.asarray(x), iters, EPS))
  want = np.asarray(jax.jit(sinkhorn_loop, static_argnums=(1, 2))(jnp.asarray(x), iters, EPS))
  assert got.shape == shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=5e-6, atol=1e-7)


@pytest.mark.parametrize("shape", _SHAPES[1:4])
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_sinkhorn_gradient_equals_loop(shape, iters):
  rng = np.random.default_rng(iters + 7 * len(shape))
  x = 2 * rng.standard_normal(shape).astype(np.float32)
  x[0, 0, :] = 0.3  # a row of ties
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  grad = lambda f: np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(w * f(x, iters, EPS))))(jnp.asarray(x)))
  got, want = grad(mhc.sinkhorn), grad(sinkhorn_loop)
  assert np.abs(want).max() > 1e-3  # not a trivially zero gradient
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
  if iters <= 3:  # the custom backward is the derivative of the unrolled forward (autodiff of that is slow to
    # compile on CPU at 20 iterations, hence few here)
    np.testing.assert_allclose(got, grad(mhc._sinkhorn_unrolled), rtol=1e-5, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("per_fusion", [1, 4])
def test_sinkhorn_is_loop_free(monkeypatch, per_fusion):
  """The projection is elementwise ops (no reduce over the n axes, no while loop) with optimization barriers: a
  single matrix crosses them as one stacked [n·n] array every ITERS_PER_FUSION iterations and after the last
  (n·n separate scalars made a kernel per value at batch 1); a batch of matrices as n·n arrays every iteration."""
  monkeypatch.setattr(mhc, "ITERS_PER_FUSION", per_fusion)
  jax.clear_caches()  # the constants are read at trace time
  for lead in [(), (1, 1), (2,), (8,)]:
    hlo = jax.jit(lambda x: mhc.sinkhorn(x, 20, EPS)).lower(jnp.zeros(lead + (N, N))).as_text()
    barriers = [line for line in hlo.splitlines() if "optimization_barrier" in line]
    assert "reduce" not in hlo and "while" not in hlo
    if int(np.prod(lead)) <= mhc.STACKED_MAX_ROWS:
      assert len(barriers) == len([it for it in range(1, 20) if it % per_fusion == 0 or it == 19])
      assert all(line.count("tensor<") == 1 and f"{N * N}xf32>" in line for line in barriers), barriers[0]
    else:
      assert len(barriers) == 19
      assert all(line.count("tensor<") == N * N for line in barriers), barriers[0]


def test_sinkhorn_forms_agree(monkeypatch):
  """The stacked and the per-array barrier forms compute the same projection (only the barriers differ)."""
  x = jnp.asarray(2.5 * np.random.default_rng(3).standard_normal((N, N)), jnp.float32)
  f = jax.jit(lambda x: mhc.sinkhorn(x, 20, EPS))
  stacked = np.asarray(f(x))
  monkeypatch.setattr(mhc, "STACKED_MAX_ROWS", 0)
  jax.clear_caches()
  np.testing.assert_allclose(np.asarray(jax.jit(lambda x: mhc.sinkhorn(x, 20, EPS))(x)), stacked, rtol=2e-6,
                             atol=1e-7)


@pytest.mark.parametrize("shape, iters, what", [((N,), 20, "square"), ((3, N, N + 1), 20, "square"),
                                                ((3, N, N), 0, "iters")])
def test_sinkhorn_rejects_bad_input(shape, iters, what):
  with pytest.raises(ValueError, match=what):
    mhc.sinkhorn(jnp.zeros(shape), iters, EPS)


def test_pre_matches_reference(hc):
  h = _streams()
  x, post, comb = hc.pre(jnp.asarray(h))
  want_x, want_post, want_comb = hc_pre_np(h, hc.fn[...], np.asarray(hc.scale[...]), np.asarray(hc.base[...]))
  np.testing.assert_allclose(np.asarray(post), want_post, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(comb), want_comb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(x), want_x, rtol=1e-5, atol=1e-5)
  assert x.dtype == jnp.float32 and x.shape == (2, 5, D)


def test_eps_placement():
  """A large hc_eps makes every +eps visible: on pre, after the row softmax, in each normalization."""
  big = mhc.HyperConnection(N, D, sinkhorn_iters=3, hc_eps=0.25, norm_eps=NORM_EPS, rngs=nnx.Rngs(1))
  big.base[...] = jnp.asarray(np.random.default_rng(9).standard_normal(big.base.shape), jnp.float32)
  h = _streams(10)
  x, post, comb = big.pre(jnp.asarray(h))
  want = hc_pre_np(h, big.fn[...], np.asarray(big.scale[...]), np.asarray(big.base[...]), iters=3, eps=0.25)
  for got, ref in zip((x, post, comb), want):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_post_matches_reference(hc):
  h, f = _streams(2), np.random.default_rng(3).standard_normal((2, 5, D)).astype(np.float32)
  _, post, comb = hc.pre(jnp.asarray(h))
  got = hc.post(jnp.asarray(f), jnp.asarray(h), post, comb)
  want = hc_post_np(f, h, np.asarray(post, np.float64), np.asarray(comb, np.float64))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_post_uses_comb_transpose(hc):
  """comb[j, k] = 1 iff k = j + 1 (mod n) moves stream j to stream j + 1."""
  res = _streams(4, B=1, S=2)
  comb = np.zeros((1, 2, N, N), np.float32)
  for j in range(N):
    comb[..., j, (j + 1) % N] = 1.0
  post = np.zeros((1, 2, N), np.float32)
  got = np.asarray(hc.post(jnp.zeros((1, 2, D)), jnp.asarray(res), jnp.asarray(post), jnp.asarray(comb)))
  np.testing.assert_array_equal(got, np.roll(res, 1, axis=2))


def test_ordering_pre_post_comb(hc):
  """Only the first n rows of fn/base move `pre`, the next n `post`, the last n·n `comb`."""
  h = jnp.asarray(_streams(5))
  _, post0, comb0 = hc.pre(h)
  x0 = hc.pre(h)[0]
  base = hc.base[...]
  for lo, hi, changes in ((0, N, "pre"), (N, 2 * N, "post"), (2 * N, N * (N + 2), "comb")):
    shifted = mhc.HyperConnection(N, D, sinkhorn_iters=20, hc_eps=EPS, norm_eps=NORM_EPS, rngs=nnx.Rngs(0))
    shifted.fn[...], shifted.scale[...] = hc.fn[...], hc.scale[...]
    shifted.base[...] = base.at[lo:hi].add(jnp.linspace(0.5, 1.5, hi - lo))
    x, post, comb = shifted.pre(h)
    assert (not np.allclose(x, x0)) == (changes == "pre")
    assert (not np.allclose(post, post0)) == (changes == "post")
    assert (not np.allclose(comb, comb0)) == (changes == "comb")


def test_head_matches_reference():
  rng = np.random.default_rng(6)
  head = mhc.HyperHead(N, D, hc_eps=EPS, norm_eps=NORM_EPS, rngs=nnx.Rngs(0))
  head.fn[...] = jnp.asarray(rng.standard_normal(head.fn.shape) * (N * D) ** -0.5, jnp.float32)
  head.base[...] = jnp.asarray(rng.standard_normal(N), jnp.float32)
  head.scale[...] = jnp.asarray([1.4], jnp.float32)
  h = _streams(7)
  mixes = mixes_np(h, head.fn[...], NORM_EPS)
  pre = sigmoid_np(mixes * 1.4 + np.asarray(head.base[...])) + EPS
  want = np.einsum("bsn,bsnd->bsd", pre, h)
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(h))), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_streams_keep_dtype(hc):
  h = jnp.asarray(_streams(8)).astype(jnp.bfloat16)
  x, post, comb = hc.pre(h)
  assert x.dtype == jnp.bfloat16 and post.dtype == jnp.float32 and comb.dtype == jnp.float32
  assert hc.post(x, h, post, comb).dtype == jnp.bfloat16
