"""Tests for dsv4_jax.model.transformer: causality by gradients for every layer type (nanodo style) across window,
block and document boundaries; MTP inputs; scanned == unscanned with the same weights; the layer plan.

Gradients w.r.t. the input embeddings are taken through the embedding table: with distinct token ids, row
tokens[j] of d(out)/d(table) is d(out)/d(input embedding at j) of the main path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax import official_names
from dsv4_jax.config import ModelConfig
from dsv4_jax.model.transformer import DeepSeekV4, LayerSpec, layer_plan


def tiny(**kw):
  return ModelConfig.preset("tiny", **kw)


# name -> (config, S, documents for the packed variant, query positions to probe)
CASES = {
    "swa": (tiny(num_hidden_layers=2, compress_ratios=(0, 0, 0)), 45, [21, 24],
            [0, 1, 15, 16, 17, 20, 21, 22, 37, 38, 44]),
    "csa": (tiny(num_hidden_layers=2, compress_ratios=(4, 4, 0), index_topk=16), 45, [21, 24],
            [0, 2, 3, 4, 15, 16, 20, 21, 22, 24, 40, 44]),
    "hca": (tiny(num_hidden_layers=2, compress_ratios=(128, 128, 0)), 261, [130, 131],
            [0, 16, 126, 127, 128, 129, 130, 131, 257, 258, 260]),
    "mixed": (tiny(), 261, [130, 131], [0, 3, 16, 126, 127, 129, 130, 131, 200, 258, 260]),
}


MTP_CASE = "swa"  # the case whose probe also differentiates the MTP logits (one compile for both)


def distinct_tokens(cfg, S, seed=0):
  return np.random.default_rng(seed).permutation(cfg.vocab_size)[:S].astype(np.int32)[None]


@functools.partial(jax.jit, static_argnames=("graphdef", "mtp"))
def sensitivity(graphdef, embed_state, rest, tokens, segment, ts, r_NV, mtp=False):
  """[len(ts), 1 or 2, S]: max_d |d (out[t] · r) / d x_j| for each probed query t and input position j; out is
  the logits, then (mtp=True) the MTP logits."""

  def out_at(embed_VD, t, r_V, which):
    model = nnx.merge(graphdef, jax.tree.map(lambda _: embed_VD, embed_state), rest)
    out = model(tokens, segment_ids=segment, with_mtp=mtp)
    return jnp.dot((out.mtp_logits if which else out.logits)[0, t], r_V)

  embed_VD = jax.tree.leaves(embed_state)[0]

  def one(args):  # lax.map, not vmap: ragged_dot has no batching rule for its transpose
    rows = [jax.grad(out_at)(embed_VD, *args, which)[tokens[0]] for which in range(1 + mtp)]
    return jnp.max(jnp.abs(jnp.stack(rows)), axis=-1)

  return jax.lax.map(one, (ts, r_NV))


def segments(S, docs):
  if docs is None:
    return np.zeros((1, S), np.int32)
  return np.concatenate([np.full(n, d, np.int32) for d, n in enumerate(docs)])[None]


def probe(model, S, docs, ts):
  """Sensitivities of the logits (and of the MTP logits, for MTP_CASE) at the probed queries."""
  graphdef, embed_state, rest = nnx.split(model, nnx.PathContains("embed"), ...)
  assert len(jax.tree.leaves(embed_state)) == 1
  cfg = model.cfg
  tokens = distinct_tokens(cfg, S)
  r = np.random.default_rng(1).standard_normal((len(ts), cfg.vocab_size)).astype(np.float32)
  seg = segments(S, docs)
  sens = sensitivity(graphdef, embed_state, rest, jnp.asarray(tokens), jnp.asarray(seg),
                     jnp.asarray(ts, jnp.int32), jnp.asarray(r), mtp=cfg == CASES[MTP_CASE][0])
  return np.asarray(sens), seg[0]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, model_factory):
  cfg, S, docs, ts = CASES[request.param]
  return request.param, model_factory(cfg), S, docs, ts


def test_causal(case):
  name, model, S, _, ts = case
  sens, _ = probe(model, S, None, ts)
  sens = sens[:, 0]
  for n, t in enumerate(ts):
    assert np.all(sens[n, t + 1:] == 0), f"{name}: logits[{t}] depend on later inputs {np.nonzero(sens[n, t + 1:])}"
    assert sens[n, t] > 0
  W = model.cfg.sliding_window
  far = [n for n, t in enumerate(ts) if t >= 2 * W + 8]  # beyond two windows: only compressed entries reach back
  if name == "swa":
    for n in far:
      assert np.all(sens[n, :ts[n] - 2 * (W - 1)] == 0)
  first_block = {"csa": 3, "hca": 127}.get(name)
  if first_block is not None:
    for n in far:
      if ts[n] >= first_block:
        assert sens[n, 0] > 0, f"{name}: query {ts[n]} does not see token 0 through the compressed entries"
  if name == "hca":  # block 0 becomes visible exactly at its last token t = 127
    assert sens[ts.index(126), 0] == 0 and sens[ts.index(127), 0] > 0


def test_documents_are_isolated(case):
  name, model, S, docs, ts = case
  sens, seg = probe(model, S, docs, ts)
  sens = sens[:, 0]
  for n, t in enumerate(ts):
    other = seg != seg[t]
    assert np.all(sens[n, other] == 0), f"{name}: query {t} depends on another document"
    assert np.all(sens[n, t + 1:] == 0)
    assert sens[n, t] > 0
  if name != "mixed":
    return
  # Swapping the two documents moves their logits unchanged (positions and blocks restart; all layer types).
  tokens = distinct_tokens(model.cfg, S)[0]
  a, b = docs
  swapped = np.concatenate([tokens[a:], tokens[:a]])
  logits = np.asarray(_forward(model, jnp.asarray(np.stack([tokens, swapped])),
                               jnp.asarray(np.concatenate([segments(S, docs), segments(S, docs[::-1])]))).logits)
  scale = np.abs(logits).max()
  np.testing.assert_allclose(logits[0, :a], logits[1, b:], rtol=2e-5, atol=2e-5 * scale)
  np.testing.assert_allclose(logits[0, a:], logits[1, :b], rtol=2e-5, atol=2e-5 * scale)


@nnx.jit
def _forward(model, tokens, segment):
  return model(tokens, segment_ids=segment)


def test_mtp_sees_next_token_only(model_factory):
  cfg, S, _, ts = CASES[MTP_CASE]
  model = model_factory(cfg)
  assert len(model.mtp) == 1
  sens, _ = probe(model, S, None, ts)
  sens = sens[:, 1]
  for n, t in enumerate(ts):
    if t == S - 1:
      continue  # the last position has no next token
    assert sens[n, t + 1] > 0, f"mtp_logits[{t}] ignore tokens[{t + 1}]"
    assert np.all(sens[n, t + 2:] == 0), f"mtp_logits[{t}] depend on tokens after {t + 1}"
    assert sens[n, t] > 0


def test_output_shapes(model_factory):
  cfg, S, _, _ = CASES["mixed"]
  model = model_factory(cfg)
  tokens = np.stack([distinct_tokens(cfg, S)[0], distinct_tokens(cfg, S, seed=1)[0]])
  out = _forward(model, jnp.asarray(tokens), jnp.zeros((2, S), jnp.int32))  # same shapes as the swap test
  assert out.logits.shape == (2, S, cfg.vocab_size) and out.logits.dtype == jnp.float32
  assert out.mtp_logits.shape == out.logits.shape and out.mtp_logits.dtype == jnp.float32
  assert out.hidden.shape == (2, S, cfg.hc_mult, cfg.hidden_size)
  assert np.all(np.isfinite(np.asarray(out.logits))) and np.all(np.isfinite(np.asarray(out.mtp_logits)))
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((S,), jnp.int32))


# ---------------------------------------------------------------------------------------------------------------
# Scanned layer stacks.
def test_flash_layer_plan():
  swa_h, csa_h = LayerSpec(0, True), LayerSpec(4, True)
  hca, csa = LayerSpec(128, False), LayerSpec(4, False)
  assert layer_plan(ModelConfig.preset("flash")) == [((swa_h,), 2), ((csa_h,), 1), ((hca, csa), 20)]
  pro = layer_plan(ModelConfig.preset("pro"))
  assert pro == [((LayerSpec(128, True),), 2), ((csa_h,), 1), ((hca, csa), 29)]
  assert layer_plan(ModelConfig.preset("flash", scan_layers=False)) == [
      ((LayerSpec(r, i < 3),), 1) for i, r in enumerate(ModelConfig.preset("flash").main_ratios)]


# A Flash-shaped schedule: 2 hash SWA layers, then 2 × (HCA, CSA); no MTP (it is never scanned).
MINI_FLASH = tiny(num_hidden_layers=6, compress_ratios=(0, 0, 128, 4, 128, 4), num_hash_layers=2,
                  num_nextn_predict_layers=0)


def _lookup(state, path):
  for key in path:
    state = state[key]
  return state


def test_scanned_equals_unscanned(model_factory):
  scanned = model_factory(MINI_FLASH)
  assert [(len(u), r) for u, r in scanned.plan] == [(1, 2), (2, 2)]
  unscanned = model_factory(MINI_FLASH.replace(scan_layers=False), seed=1)
  assert [(len(u), r) for u, r in unscanned.plan] == [(1, 1)] * 6
  _, src = nnx.split(scanned)
  graphdef, dst = nnx.split(unscanned)
  src_specs = {s.name: s for s in official_names.official_tensors(scanned)}
  dst_specs = official_names.official_tensors(unscanned)
  assert set(src_specs) == {s.name for s in dst_specs}
  written = {}
  for spec in dst_specs:
    s = src_specs[spec.name]
    value = np.asarray(_lookup(src, s.path)[...])[s.index]
    var = _lookup(dst, spec.path)
    var[...] = var[...].at[spec.index].set(value)
    written[spec.path] = written.get(spec.path, 0) + 1
  # Every variable of the unscanned model was written (experts once per expert).
  n_leaves = len(jax.tree.leaves(dst, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  assert len(written) == n_leaves
  copy = nnx.merge(graphdef, dst)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, MINI_FLASH.vocab_size, (2, 140)), jnp.int32)
  seg = jnp.asarray(np.repeat([[0] * 131 + [1] * 9], 2, axis=0), jnp.int32)
  run = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
  a, b = run(scanned, tokens, seg), run(copy, tokens, seg)
  assert a.mtp_logits is None
  for x, y in ((a.logits, b.logits), (a.hidden, b.hidden)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


def test_layer_location():
  model = nnx.eval_shape(lambda: DeepSeekV4(MINI_FLASH, rngs=nnx.Rngs(0)))
  assert [model.layer_location(i) for i in range(6)] == [
      (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
  with pytest.raises(IndexError):
    model.layer_location(6)
