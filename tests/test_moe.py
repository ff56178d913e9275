"""Tests for dsv4_jax.model.moe (spec §10): sqrt-softplus routing with a selection-only bias, hash routing from
the token table, clamped SwiGLU, grouped-matmul experts against a per-token loop, shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.model import moe

CFG = ModelConfig.preset("tiny")
E, K, D, F = CFG.n_routed_experts, CFG.num_experts_per_tok, CFG.hidden_size, CFG.moe_intermediate_size
LIMIT = CFG.swiglu_limit


def silu_np(x):
  return x / (1 + np.exp(-x))


def swiglu_np(gate, up, limit=LIMIT):
  return silu_np(np.minimum(gate, limit)) * np.clip(up, -limit, limit)


def scores_np(x_TD, weight_DE):
  logits = x_TD.astype(np.float64) @ np.asarray(weight_DE, np.float64)
  return np.sqrt(np.logaddexp(0, logits))  # sqrt(softplus)


def expert_np(x_D, w1, w3, w2):
  w1, w3, w2 = (np.asarray(w, np.float64) for w in (w1, w3, w2))
  return swiglu_np(x_D @ w1, x_D @ w3) @ w2


def routed_np(x_TD, weights_TK, experts_TK, experts):
  """Σ_k w[t, k] · expert_{e[t, k]}(x_t), one token and one expert at a time."""
  w1, w3, w2 = (np.asarray(getattr(experts, n)[...], np.float64) for n in ("w1", "w3", "w2"))
  y = np.zeros(x_TD.shape, np.float64)
  for t in range(x_TD.shape[0]):
    for k in range(experts_TK.shape[1]):
      e = int(experts_TK[t, k])
      h = swiglu_np(x_TD[t] @ w1[e], x_TD[t] @ w3[e]) * weights_TK[t, k]
      y[t] += h @ w2[e]
  return y


def random(shape, seed, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.fixture(scope="module", params=[False, True], ids=["topk", "hash"])
def layer(request):
  m = moe.MoE(CFG, hash_routed=request.param, rngs=nnx.Rngs(1))
  if not request.param:
    m.router.bias[...] = jnp.asarray(random((E,), 2, 0.5))
  return m


# Pre-activations of about ±8·N(0, 1): many gates and ups pass the ±10 limits.
X = random((24, D), 3, 8.0)
TOKENS = np.random.default_rng(4).integers(0, CFG.vocab_size, 24).astype(np.int32)


def test_clamped_swiglu():
  g = np.linspace(-40, 40, 81, dtype=np.float32)
  gate, up = np.meshgrid(g, g)
  got = np.asarray(moe.clamped_swiglu(jnp.asarray(gate), jnp.asarray(up), LIMIT))
  np.testing.assert_allclose(got, swiglu_np(gate.astype(np.float64), up.astype(np.float64)), rtol=1e-5, atol=1e-6)
  # The gate has an upper clamp only: silu(-30) ≈ -3e-12, not silu(-10) ≈ -4.5e-4.
  assert abs(float(moe.clamped_swiglu(jnp.float32(-30), jnp.float32(10), LIMIT))) < 1e-9
  np.testing.assert_allclose(float(moe.clamped_swiglu(jnp.float32(30), jnp.float32(-30), LIMIT)),
                             -10 * silu_np(10.0), rtol=1e-6)
  np.testing.assert_allclose(float(moe.clamped_swiglu(jnp.float32(30), jnp.float32(30), 0.0)),
                             30 * silu_np(30.0), rtol=1e-6)  # limit 0 disables the clamp


def test_router_hash_uses_table():
  router = moe.Router(CFG, hash_routed=True, rngs=nnx.Rngs(5))
  assert not hasattr(router, "bias")  # hash layers have no selection bias
  table = np.asarray(router.tid2eid[...])
  assert table.shape == (CFG.vocab_size, K) and table.min() >= 0 and table.max() < E
  assert all(len(set(row)) == K for row in table.tolist())  # distinct experts per token
  x = X[:, :D] / 8
  weights, experts, scores = router(jnp.asarray(x), jnp.asarray(TOKENS))
  np.testing.assert_array_equal(np.asarray(experts), table[TOKENS])
  s = scores_np(x, router.weight[...])
  np.testing.assert_allclose(np.asarray(scores), s, rtol=1e-5)
  picked = np.take_along_axis(s, table[TOKENS], axis=-1)
  want = picked / picked.sum(-1, keepdims=True) * CFG.routed_scaling_factor
  np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-5)


def test_router_bias_selects_but_does_not_weight():
  router = moe.Router(CFG, hash_routed=False, rngs=nnx.Rngs(6))
  bias = random((E,), 7, 1.0)
  router.bias[...] = jnp.asarray(bias)
  x = X / 8
  weights, experts, _ = router(jnp.asarray(x), jnp.asarray(TOKENS))
  s = scores_np(x, router.weight[...])
  want_sets = np.argsort(-(s + bias), axis=-1)[:, :K]
  np.testing.assert_array_equal(np.sort(np.asarray(experts), -1), np.sort(want_sets, -1))
  assert np.any(np.sort(want_sets, -1) != np.sort(np.argsort(-s, -1)[:, :K], -1))  # the bias matters here
  picked = np.take_along_axis(s, np.asarray(experts), axis=-1)
  want = picked / picked.sum(-1, keepdims=True) * CFG.routed_scaling_factor
  np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-5)


def test_routed_experts_match_per_token_loop(layer):
  rng = np.random.default_rng(8)
  experts = np.stack([rng.permutation(E - 2)[:K] for _ in range(X.shape[0])]).astype(np.int32)  # 2 idle experts
  weights = rng.uniform(0.1, 1.0, experts.shape).astype(np.float32)
  got = nnx.jit(lambda m, *a: m.experts(*a))(layer, jnp.asarray(X), jnp.asarray(weights), jnp.asarray(experts))
  want = routed_np(X.astype(np.float64), weights, experts, layer.experts)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
  gate = np.einsum("td,tkdf->tkf", X, np.asarray(layer.experts.w1[...])[experts])
  up = np.einsum("td,tkdf->tkf", X, np.asarray(layer.experts.w3[...])[experts])
  assert gate.max() > LIMIT and up.max() > LIMIT and up.min() < -LIMIT  # the clamps are active here


def test_moe_is_routed_plus_shared(layer):
  B, S = 2, 12
  x = X.reshape(B, S, D)
  got = np.asarray(nnx.jit(lambda m, x, t: m(x, t)[0])(layer, jnp.asarray(x), jnp.asarray(TOKENS.reshape(B, S))))
  weights, experts, _ = layer.router(jnp.asarray(X), jnp.asarray(TOKENS))
  routed = routed_np(X.astype(np.float64), np.asarray(weights, np.float64), np.asarray(experts), layer.experts)
  sh = layer.shared
  shared = np.stack([expert_np(X[t].astype(np.float64), sh.w1[...], sh.w3[...], sh.w2[...]) for t in range(len(X))])
  want = (routed + shared).reshape(B, S, D)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def dense_routed(x_TD, weights_TK, experts_TK, w1, w3, w2):
  """The routed experts with gathered per-(token, slot) weights: a differentiable dense oracle."""
  gate = jnp.einsum("TD,TKDF->TKF", x_TD, w1[experts_TK])
  up = jnp.einsum("TD,TKDF->TKF", x_TD, w3[experts_TK])
  h = moe.clamped_swiglu(gate, up, LIMIT) * weights_TK[..., None]
  return jnp.einsum("TKF,TKFD->TD", h, w2[experts_TK])


def test_routed_experts_gradients(layer):
  rng = np.random.default_rng(9)
  experts = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(X.shape[0])]).astype(np.int32))
  weights = jnp.asarray(rng.uniform(0.1, 1.0, experts.shape).astype(np.float32))
  r = jnp.asarray(random(X.shape, 10))
  graphdef, state = nnx.split(layer.experts)

  def ragged_loss(x, w, state):
    return jnp.sum(nnx.merge(graphdef, state)(x, w, experts) * r)

  def dense_loss(x, w, w1, w3, w2):
    return jnp.sum(dense_routed(x, w, experts, w1, w3, w2) * r)

  x = jnp.asarray(X)
  gx, gw, gstate = jax.jit(jax.grad(ragged_loss, argnums=(0, 1, 2)))(x, weights, state)
  got = (gx, gw, gstate["w1"][...], gstate["w3"][...], gstate["w2"][...])
  want = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2, 3, 4)))(x, weights, state["w1"][...], state["w3"][...],
                                                                 state["w2"][...])
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4 * np.abs(np.asarray(w)).max())


def _assignments(T, seed):
  """[T, K] distinct experts per token, random combine weights."""
  rng = np.random.default_rng(seed)
  experts = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
  return experts, rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)


def test_capacity_path_equals_loop_when_nothing_overflows():
  """With capacity >= tokens, the capacity-bucketed einsum path is the same function as the exact one."""
  cfg = CFG.replace(moe_impl="capacity", moe_capacity_factor=float(E))
  experts = moe.RoutedExperts(cfg, rngs=nnx.Rngs(5))
  experts_TK, weights_TK = _assignments(X.shape[0], 6)
  assert moe.moe_capacity(cfg, X.shape[0]) == X.shape[0]
  got = np.asarray(experts(jnp.asarray(X), jnp.asarray(weights_TK), jnp.asarray(experts_TK)))
  want = routed_np(X.astype(np.float64), weights_TK, experts_TK, experts)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_capacity_path_drops_overflow_in_token_order():
  """Past C rows per expert, later tokens' assignments are dropped; earlier ones are computed exactly."""
  cfg = CFG.replace(moe_impl="capacity", moe_capacity_factor=0.5)
  experts = moe.RoutedExperts(cfg, rngs=nnx.Rngs(5))
  T = X.shape[0]
  C = moe.moe_capacity(cfg, T)
  experts_TK, weights_TK = _assignments(T, 7)
  kept = np.zeros((T, K), bool)
  seen = np.zeros(E, int)
  for e in range(E):  # the path sorts stably by expert, so rows keep token order within each expert
    for t in range(T):
      for k in range(K):
        if experts_TK[t, k] == e:
          kept[t, k] = seen[e] < C
          seen[e] += 1
  assert not kept.all() and kept.any()
  got = np.asarray(experts(jnp.asarray(X), jnp.asarray(weights_TK), jnp.asarray(experts_TK)))
  want = routed_np(X.astype(np.float64), weights_TK * kept, experts_TK, experts)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def _exact_vs_ragged(T, experts_TK, weights_TK, monkeypatch, want_path):
  """(moe_impl "exact" output, ragged output, plain capacity output) of one set of weights, asserting which
  matmul path "exact" ran."""
  cfg = CFG.replace(moe_impl="exact")
  layer = moe.RoutedExperts(cfg, rngs=nnx.Rngs(11))
  x = jnp.asarray(random((T, D), 12, 8.0))
  w, e = jnp.asarray(weights_TK), jnp.asarray(experts_TK)
  ran = []
  for name in ("capacity_matmuls", "ragged_matmuls"):
    def spy(self, *a, _orig=getattr(moe.RoutedExperts, name), _name=name, **k):
      ran.append((_name, k.get("capacity")))
      return _orig(self, *a, **k)
    monkeypatch.setattr(moe.RoutedExperts, name, spy)
  got = np.asarray(layer(x, w, e))
  assert ran == [want_path]
  monkeypatch.undo()
  ragged = np.asarray(layer.ragged_matmuls(x, w, e))
  plain = np.asarray(moe.RoutedExperts.capacity_matmuls(layer, x, w, e))  # C from the factor: may drop
  return got, ragged, plain


@pytest.mark.parametrize("T", [1, 24, moe.EXACT_CAPACITY_MAX_TOKENS, moe.EXACT_CAPACITY_MAX_TOKENS + 8])
@pytest.mark.parametrize("routing", ["random", "one expert takes all"])
def test_exact_path_equals_ragged(T, routing, monkeypatch):
  """moe_impl "exact": capacity einsums with C = T up to the threshold, ragged above; never drops (one expert
  taking every token would overflow the plain capacity path's C = ceil(1.25 · T · k / E))."""
  experts_TK, weights_TK = _assignments(T, 13)
  if routing != "random":
    experts_TK[:, 0] = 3
    experts_TK[:, 1] = np.random.default_rng(14).integers(4, E, T)  # distinct from 3
  small = T <= moe.EXACT_CAPACITY_MAX_TOKENS
  assert small == moe.exact_uses_capacity(T)
  got, ragged, plain = _exact_vs_ragged(T, experts_TK, weights_TK, monkeypatch,
                                        ("capacity_matmuls", T) if small else ("ragged_matmuls", None))
  assert np.abs(ragged).max() > 0
  np.testing.assert_allclose(got, ragged, rtol=1e-5, atol=1e-5 * np.abs(ragged).max())
  if routing != "random" and T > 1:
    assert not np.allclose(plain, ragged, rtol=1e-3, atol=1e-3 * np.abs(ragged).max())  # the drops it avoids


def test_capacity_override_is_validated():
  layer = moe.RoutedExperts(CFG, rngs=nnx.Rngs(11))
  experts_TK, weights_TK = _assignments(4, 15)
  with pytest.raises(ValueError, match="capacity"):
    layer.capacity_matmuls(jnp.asarray(X[:4]), jnp.asarray(weights_TK), jnp.asarray(experts_TK), capacity=0)


def test_moe_impl_validation():
  with pytest.raises(ValueError, match="moe_impl"):
    CFG.replace(moe_impl="dense")
  assert CFG.replace(moe_impl="exact").moe_impl == "exact"
  with pytest.raises(ValueError, match="moe_capacity_factor"):
    CFG.replace(moe_capacity_factor=0.0)
