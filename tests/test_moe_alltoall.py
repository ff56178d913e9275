"""Tests for moe_impl "alltoall" (dsv4_jax/model/moe_alltoall.py): expert parallelism with an all-to-all dispatch
over the mesh's "expert" axis, on 8 fake CPU devices (run in a subprocess: the device count must be set before jax
starts; this file is also that subprocess's script), plus an ahead-of-time compile for TPU v5p (8 chips).

* the MoE layer (router, routed and shared experts) forward and gradients on meshes expert 2/4/8 (x fsdp, x tensor)
  equal the capacity path on one device when nothing is dropped;
* with overflow it drops exactly the capacity rule applied to each device's token group, and counts the drops;
* a tiny model's train step on 8 devices equals the 1-device capacity step;
* without a mesh context it is the capacity path (one warning); the Trainer traces its steps under its mesh.
"""

from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the AOT test: libtpu beside other processes using it
if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from dsv4_jax import sharding  # noqa: E402
from multidevice import run_checks, run_report  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model import moe, moe_alltoall  # noqa: E402

CFG = ModelConfig.preset("tiny")
E, K, D = CFG.n_routed_experts, CFG.num_experts_per_tok, CFG.hidden_size
EXACT = float(E)  # capacity factor giving C = tokens (per group): nothing can drop
LAYER_MESHES = {"1x4x2x1": (1, 4, 2, 1), "1x2x4x1": (1, 2, 4, 1), "1x1x8x1": (1, 1, 8, 1), "1x2x2x2": (1, 2, 2, 2)}
LAYER_CASES = [f"{m}/topk" for m in LAYER_MESHES] + ["2x1x4x1/hash"]
B, S = 8, 16


# ----- the subprocess (8 CPU devices) -------------------------------------------------------------------------
def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def tree_rel_diff(a, b) -> float:
  return max(rel_diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def layer_and_inputs(hash_routed: bool):
  layer = moe.MoE(CFG, hash_routed=hash_routed, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(2)
  if not hash_routed:
    layer.router.bias[...] = jnp.asarray(0.5 * rng.standard_normal((E,)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, S)), jnp.int32)
  probe = jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32)
  return layer, x, tokens, probe


def layer_fn(graphdef, cfg):
  """(output, d(Σ output · probe)/d(params, x)) of the MoE layer with config `cfg`."""
  def f(state, rest, x, tokens, probe):
    def loss(state, x):
      m = nnx.merge(graphdef, state, rest)
      for mod in (m.router, m.experts):
        mod.cfg = cfg
      y, _ = m(x, tokens)
      return jnp.sum(y * probe), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
    return y, grads
  return jax.jit(f)


def check_layer(report):
  out = {}
  for hashed in (False, True):
    layer, x, tokens, probe = layer_and_inputs(hashed)
    graphdef, state, rest = nnx.split(layer, nnx.Param, ...)
    on0 = lambda t: jax.device_put(t, jax.devices()[0])
    ref_y, ref_g = layer_fn(graphdef, CFG.replace(moe_impl="capacity", moe_capacity_factor=EXACT))(
        *map(on0, (state, rest, x, tokens, probe)))
    a2a = layer_fn(graphdef, CFG.replace(moe_impl="alltoall", moe_capacity_factor=EXACT))
    for case in LAYER_CASES:
      name, routing = case.split("/")
      if routing != ("hash" if hashed else "topk"):
        continue
      mesh = sharding.make_mesh(*map(int, name.split("x")))
      st = jax.device_put(state, sharding.state_shardings(state, mesh))
      rs = jax.device_put(rest, sharding.state_shardings(rest, mesh))
      args = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in (x, tokens, probe)]
      with jax.set_mesh(mesh):
        compiled = a2a.lower(st, rs, *args).compile()
      y, g = compiled(st, rs, *args)
      hlo = compiled.as_text()
      out[case] = {
          "y": rel_diff(y, ref_y), "grads": tree_rel_diff(g, ref_g), "all_to_all": hlo.count("all-to-all("),
          "w1_spec": list(st["experts"]["w1"][...].sharding.spec)}
  report["layer"] = out


def kept_by_group(experts_TK, groups: int, capacity: int):
  """[T, K] bool: the capacity rule per contiguous group (tokens padded to a multiple of `groups` with rows routed
  nowhere): each expert keeps its first `capacity` assignments of the group in (token, k) order."""
  T = experts_TK.shape[0]
  Tl = -(-T // groups)
  kept = np.zeros(experts_TK.shape, bool)
  for g in range(groups):
    seen = np.zeros(E, int)
    for t in range(g * Tl, min(T, (g + 1) * Tl)):
      for k in range(K):
        e = experts_TK[t, k]
        kept[t, k] = seen[e] < capacity
        seen[e] += 1
  return kept


def check_overflow(report):
  """Capacity factor 1: drops. The reference: the exact (ragged) path with the dropped assignments' weights zeroed,
  the drops given by the capacity rule applied to each device's contiguous token group (kept_by_group)."""
  cfg = CFG.replace(moe_capacity_factor=1.0)
  experts = moe.RoutedExperts(cfg, rngs=nnx.Rngs(5))
  graphdef, state = nnx.split(experts)
  rng = np.random.default_rng(6)

  def run(impl, x, w, e):
    m = nnx.merge(graphdef, state)
    m.cfg = cfg.replace(moe_impl=impl)
    return m(x, w, e)

  exact = jax.jit(lambda x, w, e: run("ragged", x, w, e))
  out = {}
  for name, shape, T in [("1x2x4x1", (1, 2, 4, 1), 128), ("1x1x8x1_pad", (1, 1, 8, 1), 100)]:
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    # Skewed routing (expert 0 in most tokens' choice) so groups overflow by different amounts.
    experts_TK = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    experts_TK[rng.random(T) < 0.6, 0] = 0
    dup = experts_TK[:, 1] == experts_TK[:, 0]
    experts_TK[dup, 1] = (experts_TK[dup, 0] + 1) % E
    weights_TK = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    mesh = sharding.make_mesh(*shape)
    G = moe_alltoall.num_groups(mesh, T)
    Tp = -(-T // G) * G
    C = moe.moe_capacity(cfg, Tp // G)
    with jax.set_mesh(mesh):
      got = jax.jit(lambda x, w, e: run("alltoall", x, w, e))(x, jnp.asarray(weights_TK), jnp.asarray(experts_TK))
    kept = kept_by_group(experts_TK, G, C)
    want = exact(x, jnp.asarray(weights_TK * kept), jnp.asarray(experts_TK))
    glob = jax.jit(lambda x, w, e: run("capacity", x, w, e))(x, jnp.asarray(weights_TK), jnp.asarray(experts_TK))
    padded = np.concatenate([experts_TK, np.full((Tp - T, K), E, np.int32)])  # padding rows are never counted
    out[name] = {"groups": G, "capacity": C, "rel_diff": rel_diff(got, want), "vs_global_rule": rel_diff(got, glob),
                 "dropped": int(moe_alltoall.dropped_assignments(jnp.asarray(padded), E, C, G)),
                 "dropped_np": int(np.sum(~kept))}
  report["overflow"] = out


def check_train_step(report):
  from dsv4_jax.model.transformer import DeepSeekV4
  from dsv4_jax.train import loop, optimizer
  from dsv4_jax.train import step as step_lib
  # One sliding-window layer, top-k routed, no MTP: the cheapest model that is still the whole train step.
  base = CFG.replace(num_hidden_layers=1, compress_ratios=(0,), num_nextn_predict_layers=0, num_hash_layers=0,
                     moe_capacity_factor=EXACT)
  rng = np.random.default_rng(7)
  Bt, St = 8, 32
  batch = {"tokens": rng.integers(2, base.vocab_size, (Bt, St)), "segment_ids": np.ones((Bt, St)),
           "positions": np.broadcast_to(np.arange(St), (Bt, St))}
  batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
  hp = {"mtp_weight": jnp.float32(0.0), "lr_scale": jnp.float32(1.0)}
  results = {}
  for label, impl, shape in [("one", "capacity", (1, 1, 1, 1)), ("1x2x4x1", "alltoall", (1, 2, 4, 1))]:
    cfg = base.replace(moe_impl=impl)
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    model = sharding.create_sharded(DeepSeekV4, cfg, mesh, seed=0)
    graphdef, params, buffers = step_lib.split_model(model)
    tx = optimizer.build_optimizer(params, learning_rate=1e-3, adam_eps=1e-3, ns_dtype=jnp.float32)
    replicated = NamedSharding(mesh, P())
    opt_sh = loop.optimizer_state_shardings(jax.eval_shape(tx.init, params), params, replicated)
    state = step_lib.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                                buffers=buffers, opt_state=jax.jit(tx.init, out_shardings=opt_sh)(params),
                                rng=jax.device_put(jax.random.key_data(jax.random.key(0)), replicated))
    bs = sharding.batch_sharding(mesh)
    fn = jax.jit(step_lib.make_train_step(graphdef, tx, step_lib.StepConfig(with_mtp=False)),
                 in_shardings=(jax.tree.map(lambda a: a.sharding, state), bs, replicated))
    with jax.set_mesh(mesh):
      new, metrics = fn(state, {k: jax.device_put(v, bs) for k, v in batch.items()}, hp)
    results[label] = (jax.device_get(metrics), jax.device_get(new.params))
  (m0, p0), (m1, p1) = results["one"], results["1x2x4x1"]
  report["train"] = {"loss": [float(m0["loss"]), float(m1["loss"])],
                     "metrics_rel_diff": max(rel_diff(m1[k], m0[k]) for k in ("loss", "ce", "balance",
                                                                              "grad_norm")),
                     "params_rel_diff": tree_rel_diff(p1, p0)}


def main():
  run_checks((check_layer, check_overflow, check_train_step))


# ----- the tests ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
  return run_report(__file__)


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_equals_capacity_on_one_device(report, case):
  assert report["devices"] == 8
  r = report["layer"][case]
  assert r["y"] < 1e-5 and r["grads"] < 1e-5, r
  assert r["all_to_all"] >= 2  # dispatch and return (forward), and their transposes
  assert r["w1_spec"][0] == "expert"  # the experts' weights really are split over the expert axis


@pytest.mark.parametrize("mesh", ["1x2x4x1", "1x1x8x1_pad"])
def test_overflow_drops_the_capacity_rule_per_device_group(report, mesh):
  r = report["overflow"][mesh]
  assert r["rel_diff"] < 1e-5, r
  assert r["dropped"] == r["dropped_np"] > 0, r
  assert r["vs_global_rule"] > 1e-3  # the per-group rule is not the global one: the comparison can fail


def test_train_step_equals_one_device_capacity(report):
  r = report["train"]
  assert r["metrics_rel_diff"] < 1e-5, r["loss"]
  assert r["params_rel_diff"] < 1e-4


def test_no_mesh_is_the_capacity_path(caplog):
  """Without a mesh context the alltoall path is the capacity path on the default device, with one warning."""
  experts = moe.RoutedExperts(CFG.replace(moe_impl="alltoall", moe_capacity_factor=1.0), rngs=nnx.Rngs(5))
  rng = np.random.default_rng(8)
  T = 24
  x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  e = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]), jnp.int32)
  w = jnp.asarray(rng.uniform(0.1, 1.0, (T, K)), jnp.float32)
  moe_alltoall._warned = False
  with caplog.at_level("WARNING", logger=moe_alltoall.__name__):
    got = experts(x, w, e)
    experts(x, w, e)
  assert sum("without a mesh context" in r.message for r in caplog.records) == 1
  np.testing.assert_array_equal(np.asarray(got), np.asarray(experts.capacity_matmuls(x, w, e)))


def test_aot_compile_for_v5p_has_all_to_all():
  """The MoE layer's forward + gradient compiled ahead of time for TPU v5p 2x2x2 (8 chips) with expert = 8:
  XLA:TPU keeps the dispatch / return all-to-alls (and their transposes)."""
  pytest.importorskip("aot_util")  # skips without libtpu
  from jax.experimental import topologies
  mesh = sharding.make_mesh(fsdp=1, expert=8, devices=topologies.get_topology_desc("v5p:2x2x2", "tpu").devices)
  cfg = CFG.replace(moe_impl="alltoall", dtype="bfloat16")
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: moe.MoE(cfg, hash_routed=False, rngs=nnx.Rngs(0))),
                                     nnx.Param, ...)
  on_mesh = lambda tree: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                                      sharding.state_shardings(tree, mesh))
  x = jax.ShapeDtypeStruct((8, 256, D), jnp.bfloat16, sharding=sharding.batch_sharding(mesh, 3))
  tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))

  def grads(params, rest, x, tokens):
    loss = lambda p, x: jnp.sum(jnp.square(nnx.merge(graphdef, p, rest)(x, tokens)[0].astype(jnp.float32)))
    return jax.grad(loss, argnums=(0, 1))(params, x)

  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    compiled = jax.jit(grads).lower(on_mesh(params), on_mesh(rest), x, tokens).compile()
  hlo = compiled.as_text()
  assert hlo.count("all-to-all(") >= 4, "expected the dispatch and return all-to-alls, forward and backward"


def test_trainer_traces_under_its_mesh():
  """The Trainer's jitted functions (loop.traced_under) see its mesh, so the alltoall path is taken there."""
  from jax.sharding import AbstractMesh
  from dsv4_jax.train import loop
  seen = []
  mesh = AbstractMesh((1, 2, 4, 1), sharding.MESH_AXES)
  jax.make_jaxpr(loop.traced_under(mesh, lambda x: seen.append(moe_alltoall.expert_mesh()) or x))(1.0)
  assert dict(seen[0].shape) == dict(data=1, fsdp=2, expert=4, tensor=1)


def test_config_accepts_alltoall():
  assert CFG.replace(moe_impl="alltoall").moe_impl == "alltoall"
  with pytest.raises(ValueError, match="moe_impl"):
    CFG.replace(moe_impl="all_to_all")


if __name__ == "__main__":
  main()
