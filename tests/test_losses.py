"""Tests for dsv4_jax.train.losses and the loss terms the model returns (spec §6, §10, §11): shifted targets on
packed rows, cross-entropy, the sequence-wise balance loss, the indexer KL against float64 numpy references,
loss accounting over microbatches, and where the indexer KL and the LM loss send gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.model import moe
from dsv4_jax.model.attention import indexer_kl
from dsv4_jax.model.options import ForwardOptions
from dsv4_jax.model.transformer import ModelOutput
from dsv4_jax.train import losses
from dsv4_jax.train.step import is_indexer_path, split_model


def packed_segments():
  """[5, 12] packed rows: several documents (lengths 1..12), trailing padding, an all-padding row."""
  rows = [
      [1] * 12,
      [1, 1, 1, 1, 1, 2, 2, 2, 3, 0, 0, 0],
      [1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 0, 0],
      [0] * 12,
      [1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3],
  ]
  return np.asarray(rows, np.int32)


def shifted_np(tokens, segments, shift):
  """Hand loop: position t predicts t + shift when both are in the same (non-padding) document."""
  B, S = tokens.shape
  targets, mask = np.zeros((B, S), np.int32), np.zeros((B, S), bool)
  for b in range(B):
    for t in range(S):
      u = t + shift
      if segments[b, t] != 0 and u < S and all(segments[b, j] == segments[b, t] for j in range(t, u + 1)):
        targets[b, t], mask[b, t] = tokens[b, u], True
  return targets, mask


@pytest.mark.parametrize("shift", [1, 2])
def test_shifted_targets(shift):
  seg = packed_segments()
  tokens = np.random.default_rng(0).integers(1, 100, seg.shape).astype(np.int32)
  want_t, want_m = shifted_np(tokens, seg, shift)
  got_t, got_m = (np.asarray(a) for a in losses.shifted_targets(jnp.asarray(tokens), jnp.asarray(seg), shift))
  np.testing.assert_array_equal(got_m, want_m)
  np.testing.assert_array_equal(np.where(got_m, got_t, 0), want_t)
  # Per row: (document length − shift) targets per document, none in padding.
  assert got_m.sum(axis=1).tolist() == {1: [11, 6, 6, 0, 9], 2: [10, 4, 3, 0, 7]}[shift]


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  B, S, V = 3, 7, 50
  logits = (20.0 * rng.standard_normal((B, S, V))).astype(np.float32)  # large logits: needs a stable lse
  targets = rng.integers(0, V, (B, S)).astype(np.int32)
  mask = rng.random((B, S)) < 0.6
  x = logits.astype(np.float64)
  m = x.max(-1, keepdims=True)
  logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  got_sum, got_count = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(got_sum), nll[mask].sum(), rtol=1e-6)
  assert float(got_count) == mask.sum()
  got_bf16, _ = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(got_bf16), nll[mask].sum(), rtol=2e-2)  # float32 math on bf16 logits


# ----- sequence-wise balance loss ---------------------------------------------------------------------------------
def distinct_experts(rng, shape, E, k):
  return np.argsort(rng.random(shape + (E,)), axis=-1)[..., :k].astype(np.int32)


def balance_np(scores, experts, E):
  """DeepSeek-V3 sequence-wise loss: per sequence Σ_i f_i·P_i, f_i = E/(k·S)·#tokens routed to i, P_i = mean over
  tokens of the affinity normalised over experts; mean over sequences. Also the per-expert load."""
  B, S, k = experts.shape
  total, load = 0.0, np.zeros(E)
  for b in range(B):
    count = np.zeros(E)
    for t in range(S):
      for e in experts[b, t]:
        count[e] += 1
    load += count
    f = E / (k * S) * count
    P = (scores[b] / scores[b].sum(-1, keepdims=True)).mean(0)
    total += np.sum(f * P)
  return total / B, load


def test_router_stats_matches_numpy():
  rng = np.random.default_rng(2)
  B, S, E, k = 3, 10, 8, 2
  scores = np.sqrt(np.logaddexp(0, rng.standard_normal((B, S, E)) * 2))  # sqrt-softplus affinities
  experts = distinct_experts(rng, (B, S), E, k)
  load, balance = moe.router_stats(jnp.asarray(scores, jnp.float32), jnp.asarray(experts), E)
  want_balance, want_load = balance_np(scores, experts, E)
  np.testing.assert_array_equal(np.asarray(load), want_load)
  assert float(jnp.sum(load)) == B * S * k
  np.testing.assert_allclose(float(balance), want_balance, rtol=1e-6)
  # Uniform affinities give exactly 1 whatever the routing (Σ_i f_i = E).
  _, uniform = moe.router_stats(jnp.ones((B, S, E)), jnp.asarray(experts), E)
  np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)

  # The gradient reaches the affinities through P only: d/ds_j of Σ_i f_i s_i / Σ s = (f_j − Σ_i f_i p_i) / Σ s.
  grad = np.asarray(jax.grad(lambda s: moe.router_stats(s, jnp.asarray(experts), E)[1])(
      jnp.asarray(scores, jnp.float32)))
  want = np.zeros_like(scores)
  for b in range(B):
    count = np.bincount(experts[b].ravel(), minlength=E)
    f = E / (k * S) * count
    z = scores[b].sum(-1, keepdims=True)
    p = scores[b] / z
    want[b] = (f[None] - (f[None] * p).sum(-1, keepdims=True)) / z / (S * B)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-9)


# ----- indexer KL ---------------------------------------------------------------------------------------------------
def indexer_kl_np(q, entries, lse, picked, scores, scale):
  """Per query with any picked entry: target = head-summed exp(q·k·scale − lse) on the picked entries, L1-normalised;
  KL(target ‖ softmax(scores over the picked entries)); mean over those queries."""
  B, S = q.shape[:2]
  kls = []
  for b in range(B):
    for s in range(S):
      valid = picked[b, s] >= 0
      if not valid.any():
        continue
      idx = picked[b, s][valid]
      logits = np.einsum("hc,kc->hk", q[b, s], entries[b, idx]) * scale
      mass = np.exp(logits - lse[b, s][:, None]).sum(0)
      target = mass / mass.sum()
      sc = scores[b, s][valid]
      logq = sc - sc.max() - np.log(np.exp(sc - sc.max()).sum())
      kls.append(np.sum(target * (np.log(target) - logq)))
  return np.mean(kls), len(kls)


@pytest.fixture(scope="module")
def kl_case():
  rng = np.random.default_rng(3)
  B, S, H, C, N, K = 2, 9, 3, 16, 6, 4
  scale = C ** -0.5
  q = rng.standard_normal((B, S, H, C))
  entries = rng.standard_normal((B, N, C))
  # lse of a softmax over more keys than the picked entries (window tokens, sink): probabilities below 1.
  all_logits = np.einsum("bshc,bnc->bshn", q, entries) * scale
  lse = np.log(np.exp(all_logits).sum(-1) + np.exp(rng.standard_normal((B, S, H)) + 1.0))
  picked = np.full((B, S, K), -1, np.int32)
  for b in range(B):
    for s in range(S):
      n = min(s // 2, K)  # early queries pick nothing, later ones 1..K entries
      picked[b, s, :n] = rng.permutation(N)[:n]
  scores = np.where(picked >= 0, 3.0 * rng.standard_normal((B, S, K)), -np.inf)
  arrays = {"q": q, "entries": entries, "lse": lse, "picked": picked, "scores": scores}
  return arrays, scale


def call_kl(a, scale, **over):
  a = {**a, **over}
  return indexer_kl(jnp.asarray(a["q"], jnp.float32), jnp.asarray(a["entries"], jnp.float32),
                    jnp.asarray(a["lse"], jnp.float32), jnp.asarray(a["picked"]),
                    jnp.asarray(a["scores"], jnp.float32), scale)


def test_indexer_kl_matches_numpy(kl_case):
  a, scale = kl_case
  want, n_queries = indexer_kl_np(a["q"], a["entries"], a["lse"], a["picked"], a["scores"], scale)
  assert 0 < n_queries < a["picked"].shape[0] * a["picked"].shape[1]  # some queries have nothing picked
  np.testing.assert_allclose(float(call_kl(a, scale)), want, rtol=1e-5)
  # Scores equal to the log target give zero KL.
  B, S, K = a["picked"].shape
  target_logits = np.full((B, S, K), -np.inf)
  for b in range(B):
    for s in range(S):
      valid = a["picked"][b, s] >= 0
      logits = np.einsum("hc,kc->hk", a["q"][b, s], a["entries"][b, a["picked"][b, s][valid]]) * scale
      target_logits[b, s, valid] = np.log(np.exp(logits - a["lse"][b, s][:, None]).sum(0))
  assert abs(float(call_kl(a, scale, scores=target_logits))) < 1e-5


def test_indexer_kl_gradient_only_to_scores(kl_case):
  """The target is a constant: no gradient to the main attention; d/d score = (softmax(scores) − target) / n."""
  a, scale = kl_case
  args = [jnp.asarray(a[k], jnp.float32) for k in ("q", "entries", "lse", "scores")]
  picked = jnp.asarray(a["picked"])
  grads = jax.grad(lambda q, e, l, s: indexer_kl(q, e, l, picked, s, scale), argnums=(0, 1, 2, 3))(*args)
  for g in grads[:3]:
    assert not np.any(np.asarray(g))
  g_scores = np.asarray(grads[3])
  valid = a["picked"] >= 0
  n = valid.any(-1).sum()
  want = np.zeros_like(g_scores)
  for b, s in zip(*np.nonzero(valid.any(-1))):
    v = valid[b, s]
    idx = a["picked"][b, s][v]
    logits = np.einsum("hc,kc->hk", a["q"][b, s], a["entries"][b, idx]) * scale
    mass = np.exp(logits - a["lse"][b, s][:, None]).sum(0)
    sc = a["scores"][b, s][v]
    soft = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
    want[b, s, v] = (soft - mass / mass.sum()) / n
  np.testing.assert_allclose(g_scores, want, rtol=1e-4, atol=1e-7)


# ----- accounting ----------------------------------------------------------------------------------------------------
HASHED = (True, False, False, False, False)  # tiny: layer 0 hash-routed; 4 main layers + MTP
HAS_INDEXER = (False, True, False, True, False)


def fake_output(rng, B, S, V, aux_rows):
  logits = rng.standard_normal((B, S, V)).astype(np.float32) * 3
  mtp = rng.standard_normal((B, S, V)).astype(np.float32) * 3
  aux = {"balance": jnp.asarray(aux_rows[0], jnp.float32), "indexer_kl": jnp.asarray(aux_rows[1], jnp.float32)}
  return ModelOutput(logits=jnp.asarray(logits), mtp_logits=jnp.asarray(mtp), hidden=jnp.zeros(()), aux=aux)


def test_lm_losses_terms():
  rng = np.random.default_rng(4)
  seg = packed_segments()
  B, S, V = seg.shape + (40,)
  tokens = rng.integers(0, V, (B, S)).astype(np.int32)
  balance, kl = rng.random(5), rng.random(5)
  out = fake_output(rng, B, S, V, (balance, kl))
  terms = losses.lm_losses(out, jnp.asarray(tokens), jnp.asarray(seg), hash_routed=HASHED, has_indexer=HAS_INDEXER)
  t1, m1 = shifted_np(tokens, seg, 1)
  t2, m2 = shifted_np(tokens, seg, 2)
  for logits, t, m, name in ((out.logits, t1, m1, "ce"), (out.mtp_logits, t2, m2, "mtp")):
    s, _ = losses.cross_entropy(logits, jnp.asarray(t), jnp.asarray(m))
    np.testing.assert_allclose(float(terms[f"{name}_sum"]), float(s), rtol=1e-6)
    assert float(terms[f"{name}_count"]) == m.sum()
  np.testing.assert_allclose(float(terms["balance"]), balance[1:].sum(), rtol=1e-6)  # not the hash layer
  np.testing.assert_allclose(float(terms["indexer_kl"]), kl[1] + kl[3], rtol=1e-6)  # CSA layers only
  no_mtp = losses.lm_losses(ModelOutput(out.logits, None, out.hidden, out.aux), jnp.asarray(tokens),
                            jnp.asarray(seg), hash_routed=HASHED, has_indexer=HAS_INDEXER)
  assert float(no_mtp["mtp_sum"]) == 0 and float(no_mtp["mtp_count"]) == 0
  assert float(no_mtp["ce_sum"]) == float(terms["ce_sum"])


def test_microbatch_accounting_equals_one_batch():
  """Microbatches with different token counts: the step's weighting (sums over global counts, aux terms averaged
  over microbatches) and total_loss on summed terms both give the one-batch loss."""
  rng = np.random.default_rng(5)
  seg = packed_segments()[[0, 3, 1, 2]]
  seg[1] = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # microbatch 0: 11 + 2 targets; microbatch 1: 6 + 6
  B, S, V = seg.shape + (40,)
  tokens = rng.integers(0, V, (B, S)).astype(np.int32)
  w = {"mtp_weight": 0.3, "balance_weight": 1e-2, "indexer_weight": 0.5}
  full_out = fake_output(rng, B, S, V, (rng.random(5), rng.random(5)))
  halves = [slice(0, 2), slice(2, 4)]
  # Per-microbatch aux values whose mean is the full-batch value (per-sequence means over equal halves).
  deltas = rng.random((2, 5))
  mb_aux = [(full_out.aux["balance"] + d, full_out.aux["indexer_kl"] + d) for d in (deltas[0], -deltas[0])]
  mb_terms = []
  for h, aux in zip(halves, mb_aux):
    out = ModelOutput(full_out.logits[h], full_out.mtp_logits[h], full_out.hidden,
                      {"balance": aux[0], "indexer_kl": aux[1]})
    mb_terms.append(losses.lm_losses(out, jnp.asarray(tokens[h]), jnp.asarray(seg[h]), hash_routed=HASHED,
                                     has_indexer=HAS_INDEXER))
  full = losses.lm_losses(full_out, jnp.asarray(tokens), jnp.asarray(seg), hash_routed=HASHED,
                          has_indexer=HAS_INDEXER)
  counts = [float(t["ce_count"]) for t in mb_terms]
  assert counts[0] != counts[1]  # a per-microbatch mean would weight tokens unequally
  want = float(losses.total_loss(full, **w))

  summed = jax.tree.map(lambda *x: sum(x), *mb_terms)
  np.testing.assert_allclose(float(losses.total_loss(summed, **w, n_micro=2)), want, rtol=1e-6)
  # The step's per-microbatch loss (dsv4_jax.train.step.make_train_step), summed.
  c1, c2 = float(full["ce_count"]), float(full["mtp_count"])
  step_loss = sum(float(t["ce_sum"]) / c1 + w["mtp_weight"] * float(t["mtp_sum"]) / c2
                  + (w["balance_weight"] * float(t["balance"]) + w["indexer_weight"] * float(t["indexer_kl"])) / 2
                  for t in mb_terms)
  np.testing.assert_allclose(step_loss, want, rtol=1e-6)
  naive = np.mean([float(losses.total_loss(t, **w)) for t in mb_terms])
  assert abs(naive - want) > 1e-3 * abs(want)  # the accounting matters on this batch


# ----- where the indexer KL and the LM loss send gradients (spec §6, sparse stage) --------------------------------
@pytest.fixture(scope="module")
def small_model(model_factory):
  """2 main layers: hash-routed SWA, then CSA (its indexer's input depends on layer 0 and the CSA queries)."""
  cfg = ModelConfig.preset("tiny", num_hidden_layers=2, compress_ratios=(0, 4, 0), index_topk=4)
  return model_factory(cfg, seed=1)


@pytest.fixture(scope="module")
def flow_grads(small_model):
  """Gradients w.r.t. all params of: the KL (detached indexer input), the LM loss (sparse attention), and the KL
  without the detach."""
  graphdef, params, buffers = split_model(small_model)
  rng = np.random.default_rng(6)
  B, S = 2, 40
  tokens = jnp.asarray(rng.integers(0, 512, (B, S)), jnp.int32)
  segment = jnp.asarray(np.repeat([[1] * 30 + [2] * 10], B, 0), jnp.int32)

  def terms(p, detach):
    opts = ForwardOptions(collect_aux=True, indexer_loss=True, detach_indexer_input=detach)
    out = nnx.merge(graphdef, p, buffers)(tokens, segment, with_mtp=False, options=opts)
    targets, mask = losses.shifted_targets(tokens, segment, 1)
    return out.aux["indexer_kl"].sum(), losses.cross_entropy(out.logits, targets, mask)[0]

  @jax.jit
  def grads(p):
    (kl, _), vjp = jax.vjp(lambda p: terms(p, True), p)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    g_kl, = vjp((one, zero))
    g_ce, = vjp((zero, one))
    g_kl_attached = jax.grad(lambda p: terms(p, False)[0])(p)
    return kl, g_kl, g_ce, g_kl_attached

  kl, *gs = grads(params)
  assert float(kl) > 0
  flat = lambda g: [(p, np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(g)]
  return [flat(g) for g in gs]


def test_detached_indexer_kl_does_not_reach_backbone(flow_grads):
  g_kl, _, g_attached = flow_grads
  idx = [np.abs(g).max() for p, g in g_kl if is_indexer_path(p)]
  assert len(idx) > 0 and min(idx) > 0  # every indexer tensor learns from the KL
  for p, g in g_kl:
    if not is_indexer_path(p):
      assert not np.any(g), jax.tree_util.keystr(p)
  # Without the detach the same KL reaches the backbone, through the indexer's inputs only: x (embedding, layer 0,
  # the CSA layer's pre-attention mHC and norm) and the shared query latent (wq_a, q_norm).
  leaked = {jax.tree_util.keystr(p) for p, g in g_attached if not is_indexer_path(p) and np.any(g)}
  csa = "['stacks'][1]['units']['blocks'][0]"
  assert {"['embed'].value", f"{csa}['attn']['wq_a'].value", f"{csa}['attn']['q_norm']['weight'].value"} <= leaked
  inputs = ("['embed']", "['stacks'][0]", f"{csa}['attn_hc']", f"{csa}['attn_norm']", f"{csa}['attn']['wq_a']",
            f"{csa}['attn']['q_norm']")
  assert all(p.startswith(inputs) for p in leaked), leaked


def test_lm_loss_does_not_reach_indexer(flow_grads):
  _, g_ce, _ = flow_grads
  assert any(np.any(g) for p, g in g_ce if not is_indexer_path(p))
  for p, g in g_ce:
    if is_indexer_path(p):
      assert not np.any(g), jax.tree_util.keystr(p)
