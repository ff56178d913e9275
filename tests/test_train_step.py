"""Tests for dsv4_jax.train.step on a 2-layer tiny model: gradient accumulation == one batch, the routing-bias
update, what each stage of the indexer curriculum trains, the NaN guard, anticipatory routing overrides, MTP off.
(Where the indexer KL and the LM loss send gradients is checked on the model in test_losses.py.)

The optimizer is SGD with decoupled weight decay, update = −LR·(g + WD·p): a parameter with no gradient still
moves (by decay) unless the step masks it, and the gradient is recovered from an update as
g = −(new − old)/LR − WD·old. Compiled steps are shared by the module (each compile takes about 10 s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.train import step as step_lib

# Layers: hash-routed SWA, bias-routed CSA (with an indexer), MTP (SWA, bias-routed): every case the step treats
# differently, at a fraction of the full tiny model's compile time.
CFG = ModelConfig.preset("tiny", num_hidden_layers=2, compress_ratios=(0, 4, 0))
E, K = CFG.n_routed_experts, CFG.num_experts_per_tok
LR, WD = 1.0, 0.01
SPEED = 2.0 ** -4  # bias update speed, exact in float32
HP = {"mtp_weight": jnp.float32(0.3), "lr_scale": jnp.float32(1.0)}


def make_batch():
  """B = 4, S = 64. Microbatches (rows 0–1, 2–3) differ in next-token counts (123 vs 125) but have the same number
  of queries with a visible compressed entry (61 + 58), so their indexer-KL means combine like one batch."""
  S = 64
  docs = [[64], [61, -3], [64], [3, 61]]  # negative = padding
  rng = np.random.default_rng(0)
  tokens, segments, positions = [], [], []
  for row in docs:
    seg, pos = [], []
    for i, n in enumerate(row):
      seg += [0 if n < 0 else i + 1] * abs(n)
      pos += [0] * abs(n) if n < 0 else list(range(n))
    tokens.append(np.where(np.asarray(seg) > 0, rng.integers(1, CFG.vocab_size, S), 0))
    segments.append(seg)
    positions.append(pos)
  return {k: jnp.asarray(np.asarray(v), jnp.int32) for k, v in
          (("tokens", tokens), ("segment_ids", segments), ("positions", positions))}


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """Most XLA optimisations off while this module compiles its steps (about 30% faster on CPU; tiny shapes)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def model(model_factory):
  return model_factory(CFG)


@pytest.fixture(scope="module")
def setup(model):
  graphdef, _, _ = step_lib.split_model(model)
  tx = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR))
  state = step_lib.init_state(model, tx)

  @functools.cache
  def step_fn(stage="sparse", grad_accum=1, with_mtp=True):
    scfg = step_lib.StepConfig(grad_accum=grad_accum, stage=stage, balance_weight=1e-2, indexer_weight=1.0,
                               bias_update_speed=SPEED, with_mtp=with_mtp)
    return jax.jit(step_lib.make_train_step(graphdef, tx, scfg))

  route = jax.jit(step_lib.make_route_fn(graphdef, with_mtp=True))
  return graphdef, state, step_fn, route, make_batch()


@pytest.fixture(scope="module")
def sparse_step(setup):
  """(new state, metrics) of one sparse-stage step, grad_accum = 1."""
  _, state, step_fn, _, batch = setup
  return step_fn()(state, batch, HP)


@pytest.fixture(scope="module")
def routing(setup):
  _, state, _, route, batch = setup
  return route(state.params, state.buffers, batch)


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def grads_from_update(old, new):
  """{path: the gradient the SGD-with-decay update applied}."""
  o, n = leaves(old), leaves(new)
  return {k: -(n[k].astype(np.float64) - o[k]) / LR - WD * o[k].astype(np.float64) for k in o}


def is_indexer(key: str) -> bool:
  return "['indexer']" in key


def has_gradient(g, old):
  return np.max(np.abs(g)) > 1e-5 * max(1.0, float(np.max(np.abs(old))))


def router_bias(graphdef, state, layer):
  """The bias of MoE layer `layer` in aux order (main layers, then MTP), or None for a hash-routed layer."""
  model = nnx.merge(graphdef, state.params, state.buffers)
  if layer == CFG.num_hidden_layers:
    return np.asarray(model.mtp[0].block.ffn.router.bias[...])
  s, rep, pos = model.layer_location(layer)
  router = model.stacks[s].units.blocks[pos].ffn.router
  return None if router.hash_routed else np.asarray(router.bias[...][rep])


def expected_bias(old, routing_BSK):
  load = np.bincount(np.asarray(routing_BSK).ravel(), minlength=E).astype(np.float32)
  delta = np.float32(SPEED) * np.sign(load.mean() - load).astype(np.float32)
  return (old + delta).astype(np.float32), load


# ----- accumulation -----------------------------------------------------------------------------------------------
def test_grad_accum_matches_one_batch(setup, sparse_step):
  _, state, step_fn, _, batch = setup
  one_state, one = sparse_step
  two_state, two = step_fn(grad_accum=2)(state, batch, HP)
  assert bool(one["finite"]) and bool(two["finite"])
  assert float(one["tokens"]) == float(two["tokens"]) == 63 + 60 + 63 + 62
  for k in ("loss", "ce", "mtp_ce", "balance", "indexer_kl", "grad_norm", "max_expert_load"):
    np.testing.assert_allclose(float(two[k]), float(one[k]), rtol=2e-6, err_msg=k)
  assert float(one["indexer_kl"]) > 0 and float(one["balance"]) > 0 and float(one["mtp_ce"]) > 0
  p1, p2 = leaves(one_state.params), leaves(two_state.params)
  for k in p1:
    scale = max(np.max(np.abs(p1[k])), 1e-3)
    np.testing.assert_allclose(p2[k], p1[k], rtol=0, atol=1e-5 * scale, err_msg=k)
  jax.tree.map(np.testing.assert_array_equal, leaves(one_state.buffers), leaves(two_state.buffers))
  assert int(one_state.step) == int(two_state.step) == 1


# ----- routing bias -------------------------------------------------------------------------------------------------
def test_bias_update_direction(setup, sparse_step, routing):
  graphdef, state, _, _, _ = setup
  new_state, _ = sparse_step
  hashed, _ = nnx.merge(graphdef, state.params, state.buffers).moe_layer_flags(True)
  assert routing.shape == (CFG.num_hidden_layers + 1, 4, 64, K)
  for layer, is_hash in enumerate(hashed):
    old, new = router_bias(graphdef, state, layer), router_bias(graphdef, new_state, layer)
    if is_hash:
      assert old is None and new is None
      continue
    want, load = expected_bias(old, routing[layer])
    over, under = load > load.mean(), load < load.mean()
    assert over.any() and under.any()
    np.testing.assert_array_equal(new, want, err_msg=f"layer {layer}")
    assert np.all(new[over] < old[over]) and np.all(new[under] > old[under])
  # The hash table is a buffer too, and never moves.
  b0, b1 = leaves(state.buffers), leaves(new_state.buffers)
  tables = [k for k in b0 if "tid2eid" in k]
  assert tables and all(np.array_equal(b0[k], b1[k]) for k in tables)


# ----- stages -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def warmup_step(setup):
  _, state, step_fn, _, batch = setup
  return step_fn("warmup")(state, batch, HP)


@pytest.fixture(scope="module")
def dense_step(setup):
  """Dense stage without MTP."""
  _, state, step_fn, _, batch = setup
  return step_fn("dense", with_mtp=False)(state, batch, HP)


def test_dense_stage_freezes_indexers(setup, dense_step):
  _, state, _, _, _ = setup
  new_state, metrics = dense_step
  old, new = leaves(state.params), leaves(new_state.params)
  grads = grads_from_update(state.params, new_state.params)
  assert any(map(is_indexer, old))
  for k in old:
    if is_indexer(k):
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)  # no gradient and no weight decay
    elif k.startswith("['mtp']"):
      assert not has_gradient(grads[k], old[k]), k  # MTP off: decay only
      assert not np.array_equal(new[k], old[k]), k
    else:
      assert has_gradient(grads[k], old[k]), k
  assert float(metrics["mtp_ce"]) == 0.0 and float(metrics["indexer_kl"]) == 0.0


def test_warmup_stage_trains_only_indexers(setup, warmup_step):
  _, state, _, _, _ = setup
  new_state, metrics = warmup_step
  old, new = leaves(state.params), leaves(new_state.params)
  grads = grads_from_update(state.params, new_state.params)
  for k in old:
    if is_indexer(k):
      assert has_gradient(grads[k], old[k]), k
    else:
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)
  assert float(metrics["indexer_kl"]) > 0
  # Warmup leaves the routing biases alone.
  jax.tree.map(np.testing.assert_array_equal, leaves(state.buffers), leaves(new_state.buffers))


def test_sparse_stage_trains_everything(setup, sparse_step):
  _, state, _, _, _ = setup
  new_state, _ = sparse_step
  old = leaves(state.params)
  grads = grads_from_update(state.params, new_state.params)
  assert sum(map(is_indexer, old)) >= 5  # wq_b, weights_proj, the indexer compressor's tensors
  for k in old:
    assert has_gradient(grads[k], old[k]), k


def test_mtp_off_keeps_main_ce(dense_step, warmup_step):
  """Dense stage without MTP vs warmup with MTP: both attend every visible entry, so the main CE agrees."""
  np.testing.assert_allclose(float(dense_step[1]["ce"]), float(warmup_step[1]["ce"]), rtol=1e-6)
  assert float(warmup_step[1]["mtp_ce"]) > 0 and float(dense_step[1]["mtp_ce"]) == 0


# ----- NaN guard ----------------------------------------------------------------------------------------------------
def assert_same_state(a, b):
  la, lb = leaves(a), leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    assert la[k].dtype == lb[k].dtype and np.array_equal(la[k], lb[k], equal_nan=True), k


def test_nan_lr_leaves_state_untouched(setup):
  _, state, step_fn, _, batch = setup
  before = jax.tree.map(np.array, state)  # host copy
  new_state, metrics = step_fn()(state, batch, {**HP, "lr_scale": jnp.float32(np.nan)})
  assert not bool(metrics["finite"])
  assert_same_state(new_state, before)


def test_nan_loss_leaves_state_untouched(setup):
  _, state, step_fn, _, batch = setup
  poisoned = jax.tree_util.tree_map_with_path(
      lambda p, a: a.at[0, 0].set(jnp.nan) if jax.tree_util.keystr(p) == "['head'].value" else a, state.params)
  state = step_lib.TrainState(state.step, poisoned, state.buffers, state.opt_state, state.rng)
  before = jax.tree.map(np.array, state)
  new_state, metrics = step_fn()(state, batch, HP)
  assert not np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
  assert_same_state(new_state, before)


# ----- anticipatory routing -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def routed_step(setup):
  """fn(routing) -> (state, metrics): grad_accum = 2 with a routing override (split with the batch)."""
  _, state, step_fn, _, batch = setup
  return lambda r: step_fn(grad_accum=2)(state, batch, HP, r)


def test_own_routing_reproduces_the_step(sparse_step, routing, routed_step):
  _, base = sparse_step
  _, same = routed_step(routing)
  for k in ("loss", "ce", "mtp_ce", "balance", "indexer_kl", "max_expert_load"):
    np.testing.assert_allclose(float(same[k]), float(base[k]), rtol=2e-6, err_msg=k)
  # The order of a token's k experts does not matter: each weight belongs to its expert.
  _, swapped = routed_step(routing[..., ::-1])
  np.testing.assert_allclose(float(swapped["loss"]), float(base["loss"]), rtol=2e-6)


def test_other_routing_is_used(setup, sparse_step, routing, routed_step):
  graphdef, state, _, _, _ = setup
  _, base = sparse_step
  layer = 1  # bias-routed CSA layer
  rolled = routing.at[layer].set((routing[layer] + 1) % E)
  new_state, metrics = routed_step(rolled)
  assert bool(metrics["finite"])
  assert abs(float(metrics["ce"]) - float(base["ce"])) > 1e-4 * float(base["ce"])
  # Router statistics and the bias update follow the override.
  want, _ = expected_bias(router_bias(graphdef, state, layer), rolled[layer])
  np.testing.assert_array_equal(router_bias(graphdef, new_state, layer), want)
  load = np.stack([np.bincount(np.asarray(r).ravel(), minlength=E) for r in rolled]).astype(np.float64)
  np.testing.assert_allclose(float(metrics["max_expert_load"]), np.max(load / load.mean(-1, keepdims=True)),
                             rtol=1e-6)


def test_bias_update_reaches_scanned_layers(model_factory):
  """update_routing_bias on a model whose layers 1–4 are one scanned stack of 2 × (CSA, HCA): each layer's load
  moves its own row of the stacked bias (eager, no compile)."""
  cfg = ModelConfig.preset("tiny", num_hidden_layers=5, compress_ratios=(0, 4, 128, 4, 128, 0))
  graphdef, state = nnx.split(model_factory(cfg))
  model = nnx.merge(graphdef, state, copy=True)  # the cached model stays as it is
  assert [r for _, r in model.plan] == [1, 2]
  stacked = lambda: [np.asarray(model.stacks[1].units.blocks[p].ffn.router.bias[...]) for p in (0, 1)]
  mtp_bias = lambda: np.asarray(model.mtp[0].block.ffn.router.bias[...])
  old, old_mtp = stacked(), mtp_bias()
  load = np.random.default_rng(7).integers(0, 20, (cfg.num_hidden_layers + 1, E)).astype(np.float32)
  model.update_routing_bias(jnp.asarray(load), SPEED, with_mtp=True)
  step = lambda l: np.float32(SPEED) * np.sign(load[l].mean() - load[l]).astype(np.float32)
  new = stacked()
  # Layer 1 + 2·rep + pos lives at stacks[1], blocks[pos], row rep.
  for pos in (0, 1):
    for rep in (0, 1):
      np.testing.assert_array_equal(new[pos][rep], old[pos][rep] + step(1 + 2 * rep + pos))
  np.testing.assert_array_equal(mtp_bias(), old_mtp + step(cfg.num_hidden_layers))
  assert model.stacks[0].units.blocks[0].ffn.router.hash_routed  # layer 0: no bias to move
