"""Muon (hybrid Newton–Schulz) + AdamW optimizer and the LR schedule (spec §12) against float64 numpy references."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv4_jax.train import optimizer

WD, MU, GAMMA, B1, B2, EPS = 0.1, 0.95, 0.18, 0.9, 0.95, 1e-20
STEPS = 4


# ----- float64 references ---------------------------------------------------------------------------------------
def ns_np(g):
  """HybridNS of one or a batch of matrices (spec §12), float64."""
  g = np.asarray(g, np.float64)
  tall = g.shape[-2] > g.shape[-1]
  x = np.swapaxes(g, -1, -2) if tall else g
  x = x / (np.sqrt(np.sum(x * x, axis=(-2, -1), keepdims=True)) + optimizer.NS_EPS)
  for a, b, c in [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2:
    xxt = x @ np.swapaxes(x, -1, -2)
    x = a * x + b * xxt @ x + c * xxt @ xxt @ x
  return np.swapaxes(x, -1, -2) if tall else x


def muon_np(w, grads, lrs, batch):
  """Muon with decoupled decay, matrix by matrix: `batch` leading dims index matrices, then rows, then columns."""
  w = np.array(w, np.float64)
  out = np.empty_like(w)
  for idx in np.ndindex(*w.shape[:batch]):
    wm = w[idx].reshape(w.shape[batch], -1)
    n, m = wm.shape
    mom = np.zeros_like(wm)
    for g, lr in zip(grads, lrs):
      gm = np.asarray(g, np.float64)[idx].reshape(n, m)
      mom = MU * mom + gm
      o = ns_np(MU * mom + gm) * math.sqrt(max(n, m)) * GAMMA
      wm = wm * (1 - lr * WD) - lr * o
    out[idx] = wm.reshape(w.shape[batch:])
  return out


def adamw_np(w, grads, lrs):
  w = np.array(w, np.float64)
  m, v = np.zeros_like(w), np.zeros_like(w)
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    g = np.asarray(g, np.float64)
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    u = (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
    w = w - lr * (u + WD * w)
  return w


# ----- a toy module with one leaf of each kind --------------------------------------------------------------------
L, E, G = 2, 3, 2


def _p(shape, axes, rng, offset=0.0):
  return nnx.Param(jnp.asarray(offset + rng.standard_normal(shape), jnp.float32), logical_axes=axes)


class Toy(nnx.Module):
  def __init__(self, seed):
    rng = np.random.default_rng(seed)
    self.dense = _p((16, 24), ("embed", "mlp"), rng)
    self.tall = _p((40, 12), ("mlp", "embed"), rng)
    self.wq_b = _p((12, 3, 8), ("q_lora", "heads", "head_dim"), rng)
    self.experts = _p((E, 16, 10), ("experts", "embed", "mlp"), rng)
    self.stacked = _p((L, E, 10, 16), ("experts", "mlp", "embed"), rng)  # a scanned layer stack of experts
    self.wo_a = _p((L, G, 12, 8), ("o_groups", "o_group_in", "o_lora"), rng)
    self.router = _p((16, E), ("embed", "experts"), rng)
    self.norm = _p((16,), ("norm",), rng, offset=1.0)
    self.ape = _p((4, 12), (None, "compress"), rng)
    self.attn_hc = nnx.Dict(fn=_p((6, 32), ("hc_mix", "hc_embed"), rng), base=_p((L, 6), ("hc_mix",), rng))
    self.sink = _p((L, 3), ("heads",), rng)


# leaf -> leading batch dims of its matrices (None: AdamW)
TOY_BATCH = {"dense": 0, "tall": 0, "wq_b": 0, "experts": 1, "stacked": 2, "wo_a": 2, "router": 0,
             "norm": None, "ape": None, "attn_hc/fn": None, "attn_hc/base": None, "sink": None}


def _key_str(path):
  return "/".join(str(k) for k in optimizer.path_key(path))


def _flat(tree, conv=np.asarray):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {_key_str(p): conv(x[...] if isinstance(x, nnx.Variable) else x) for p, x in flat}


def _random_grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)


def _run(tx, params, grads_list, jit=True):
  """Applies `tx` step by step; returns the list of parameter trees after each step."""

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  state, history = tx.init(params), []
  for g in grads_list:
    params, state = step(params, state, g)
    history.append(params)
  return history


SCHED = optimizer.lr_schedule(0.05, 2, 10, 3, 0.005)


@pytest.fixture(scope="module")
def toy():
  graphdef, params, rest = nnx.split(Toy(0), nnx.Param, ...)
  grads = [_random_grads(params, s) for s in range(STEPS)]
  tx = optimizer.build_optimizer(params, SCHED, ns_dtype=jnp.float32)
  return params, grads, _run(tx, params, grads)


# ----- tests ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 16, 48), (48, 16), (2, 2, 32, 32)])
def test_hybrid_newton_schulz_matches_float64(shape):
  g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  ref = ns_np(g)
  y32 = np.asarray(optimizer.hybrid_newton_schulz(jnp.asarray(g), jnp.float32), np.float64)
  np.testing.assert_allclose(y32, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  y16 = optimizer.hybrid_newton_schulz(jnp.asarray(g), jnp.bfloat16)
  assert y16.dtype == jnp.float32 and y16.shape == g.shape
  y16 = np.asarray(y16, np.float64)
  assert np.linalg.norm(y16 - ref) < 0.02 * np.linalg.norm(ref)
  for y, band in ((ref, 1e-3), (y32, 1e-3), (y16, 2e-2)):  # orthogonalised: singular values near 1
    s = np.linalg.svd(y, compute_uv=False)
    assert np.all(np.abs(s - 1) < band), (s.min(), s.max())


def test_lr_schedule_points():
  s = optimizer.lr_schedule(1.0, 10, 100, 40, 0.1)
  cos_at = lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 40) / 60))
  for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (25, 1.0), (39, 1.0), (40, 1.0), (55, cos_at(55)),
                     (70, 0.55), (99, cos_at(99)), (100, 0.1), (500, 0.1)]:
    assert float(s(step)) == pytest.approx(want, rel=1e-6, abs=1e-7), step
  assert float(jax.jit(s)(jnp.int32(70))) == pytest.approx(0.55, rel=1e-6)
  assert float(optimizer.lr_schedule(2.0, 0, 10, 5, 0.0)(0)) == 2.0
  with pytest.raises(ValueError):
    optimizer.lr_schedule(1.0, 50, 100, 40, 0.1)


def test_toy_labels_and_layouts(toy):
  params = toy[0]
  labels = _flat(optimizer.param_labels(params), str)
  assert labels == {k: ("adamw" if b is None else "muon") for k, b in TOY_BATCH.items()}
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, v in flat:
    k = _key_str(path)
    if TOY_BATCH[k] is not None:
      assert optimizer.leaf_layout(optimizer.path_key(path), v).batch == TOY_BATCH[k], k


@pytest.mark.parametrize("name", [k for k, b in TOY_BATCH.items() if b is not None])
def test_muon_matches_float64_reference(toy, name):
  params, grads, history = toy
  lrs = [float(SCHED(t)) for t in range(STEPS)]
  w0 = _flat(params)[name]
  ref = muon_np(w0, [_flat(g)[name] for g in grads], lrs, TOY_BATCH[name])
  got = _flat(history[-1])[name]
  moved = np.abs(ref - w0).max()
  assert moved > 1e-3
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * moved)


@pytest.mark.parametrize("name", [k for k, b in TOY_BATCH.items() if b is None])
def test_adamw_matches_float64_reference(toy, name):
  params, grads, history = toy
  lrs = [float(SCHED(t)) for t in range(STEPS)]
  w0 = _flat(params)[name]
  ref = adamw_np(w0, [_flat(g)[name] for g in grads], lrs)
  np.testing.assert_allclose(_flat(history[-1])[name], ref, rtol=1e-5, atol=1e-6)


def test_adamw_tiny_eps_zero_gradient():
  """ε = 1e-20: a gradient of exactly zero gives an exactly-zero Adam step (only the decay moves the weight)."""
  params = nnx.split(Toy(1), nnx.Param, ...)[1]
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = optimizer.build_optimizer(params, 0.1, ns_dtype=jnp.float32)
  new = _flat(_run(tx, params, [grads])[-1])
  old = _flat(params)
  np.testing.assert_allclose(new["norm"], old["norm"] * (1 - 0.1 * WD), rtol=1e-6)


def test_trainable_tree_and_pure_trees(toy):
  params, grads, _ = toy
  frozen = {"dense", "experts", "norm", "attn_hc/base"}
  mask = jax.tree_util.tree_map_with_path(lambda p, _: _key_str(p) not in frozen, nnx.as_pure(params))
  tx = optimizer.build_optimizer(params, SCHED, trainable=mask)
  pure = nnx.as_pure(params)  # the same tree as plain arrays (what nnx.Optimizer hands over)
  last = _flat(_run(tx, pure, [nnx.as_pure(g) for g in grads[:2]])[-1])
  first = _flat(params)
  for k in TOY_BATCH:
    assert np.array_equal(last[k], first[k]) == (k in frozen), k
  # pure-dict trees work too
  dict_last = _flat(_run(tx, nnx.to_pure_dict(params), [nnx.to_pure_dict(grads[0])], jit=False)[-1])
  assert set(dict_last) == set(TOY_BATCH)


def test_missing_metadata_names_the_path():
  params = nnx.split(Toy(0), nnx.Param, ...)[1]
  params["attn_hc"]["base"] = params["attn_hc"]["base"][...]
  with pytest.raises(ValueError, match="'attn_hc/base' has no usable `logical_axes`"):
    optimizer.build_optimizer(params, 0.1)


def test_nnx_optimizer_wrapper():
  model = Toy(2)
  before = _flat(nnx.state(model, nnx.Param))
  params = nnx.state(model, nnx.Param)
  opt = nnx.Optimizer(model, optimizer.build_optimizer(params, 0.01), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, grads):
    opt.update(model, grads)

  step(model, opt, _random_grads(params, 0))
  after = _flat(nnx.state(model, nnx.Param))
  assert all(not np.array_equal(before[k], after[k]) for k in before)


# ----- the tiny model ---------------------------------------------------------------------------------------------
BLOCK_ADAMW = {
    "attn/attn_sink", "attn/kv_norm/weight", "attn/q_norm/weight", "attn/compressor/ape",
    "attn/compressor/norm/weight", "attn/indexer/compressor/ape", "attn/indexer/compressor/norm/weight",
    "attn_hc/base", "attn_hc/fn", "attn_hc/scale", "attn_norm/weight", "ffn_hc/base", "ffn_hc/fn", "ffn_hc/scale",
    "ffn_norm/weight"}
BLOCK_MUON = {
    "attn/wq_a", "attn/wq_b", "attn/wkv", "attn/wo_a", "attn/wo_b", "attn/compressor/wkv", "attn/compressor/wgate",
    "attn/indexer/wq_b", "attn/indexer/weights_proj", "attn/indexer/compressor/wkv",
    "attn/indexer/compressor/wgate", "ffn/experts/w1", "ffn/experts/w2", "ffn/experts/w3", "ffn/router/weight",
    "ffn/shared/w1", "ffn/shared/w2", "ffn/shared/w3"}
TOP_ADAMW = {"embed", "head", "norm/weight", "hc_head/base", "hc_head/fn", "hc_head/scale", "mtp/0/enorm/weight",
             "mtp/0/hnorm/weight", "mtp/0/norm/weight", "mtp/0/hc_head/base", "mtp/0/hc_head/fn",
             "mtp/0/hc_head/scale"}
TOP_MUON = {"mtp/0/e_proj", "mtp/0/h_proj"}
_BLOCK = re.compile(r"^(stacks/\d+/units/blocks/\d+|mtp/\d+/block)/")


def test_tiny_model_labels(tiny_model):
  params = nnx.split(tiny_model, nnx.Param, ...)[1]
  labels = _flat(optimizer.param_labels(params), str)
  seen = {"adamw": set(), "muon": set()}
  for path, label in labels.items():
    m = _BLOCK.match(path)
    name = path[m.end():] if m else path
    want = "adamw" if name in (BLOCK_ADAMW if m else TOP_ADAMW) else "muon"
    assert name in (BLOCK_ADAMW | BLOCK_MUON if m else TOP_ADAMW | TOP_MUON), path
    assert label == want, path
    seen[label].add(("B/" if m else "") + name)
  assert seen["adamw"] == {"B/" + n for n in BLOCK_ADAMW} | TOP_ADAMW
  assert seen["muon"] == {"B/" + n for n in BLOCK_MUON} | TOP_MUON
  for path in ("embed", "head", "norm/weight", "hc_head/fn", "stacks/0/units/blocks/0/attn_hc/base",
               "stacks/0/units/blocks/0/attn/attn_sink", "stacks/1/units/blocks/0/attn/compressor/ape"):
    assert labels[path] == "adamw", path
  for path in ("stacks/0/units/blocks/0/attn/wq_a", "stacks/1/units/blocks/0/attn/compressor/wkv",
               "stacks/0/units/blocks/0/ffn/experts/w1", "stacks/0/units/blocks/0/ffn/router/weight"):
    assert labels[path] == "muon", path


def test_tiny_model_jit_with_frozen_params(tiny_model):
  """Three jitted steps on the nnx.State: frozen leaves stay bit-identical, all others move."""
  params = nnx.split(tiny_model, nnx.Param, ...)[1]
  frozen = lambda key: key[0] in ("embed", "mtp") or key[-1] == "attn_sink" or "experts" in key
  tx = optimizer.build_optimizer(params, optimizer.lr_schedule(1e-2, 1, 10, 5, 1e-3),
                                 trainable=lambda key: not frozen(key))
  grads = [_random_grads(params, s) for s in range(3)]
  last = _run(tx, params, grads)[-1]
  assert isinstance(jax.tree.leaves(last, is_leaf=lambda x: isinstance(x, nnx.Variable))[0], nnx.Param)
  before, after = _flat(params), _flat(last)
  n_frozen = 0
  for k in before:
    key = tuple(int(s) if s.isdigit() else s for s in k.split("/"))
    if frozen(key):
      n_frozen += 1
      assert np.array_equal(before[k], after[k]), k
    else:
      assert np.isfinite(after[k]).all() and not np.array_equal(before[k], after[k]), k
  assert n_frozen > 10
