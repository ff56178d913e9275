"""Tests for dsv4_jax/model/kernel_sharding.py: the three kernel ops (sparse_attention, indexer_topk, compress) run
per device on its batch shard (and sparse_attention's heads over "tensor") under jax.shard_map, on 8 fake CPU
devices (a subprocess: the device count must be set before jax starts; this file is also its script).

* forward outputs and gradients of every differentiable input, through the wrapper inside a jit with sharded inputs
  under `use_abstract_mesh`, equal the plain call on one device, on data/fsdp/expert and fsdp/data x tensor meshes
  (the reference forced through shard_map; sparse_attention also with the TPU kernel in interpret mode);
* the compiled wrapped function has no all-gather (the plain TPU-interpret call under GSPMD has: the check can fail);
* a batch the batch axes do not divide falls back (or splits over the axes that divide it) with one warning;
* a tiny CSA model's forward with attention_impl="tpu" (interpret) on a 2x2x2x1 mesh equals the unmeshed forward;
* without a mesh context, or with a pure-JAX implementation, the call is the plain one;
* compiled ahead of time for TPU v5p (8 chips, Mosaic kernels), every kernel custom call has per-shard shapes (the
  unwrapped call does not compile there at all: Mosaic kernels cannot be partitioned automatically).
"""

from __future__ import annotations

import functools
import logging
import os
import re

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the AOT test: libtpu beside other processes using it
if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import pallas_kernels  # noqa: E402
from dsv4_jax import sharding  # noqa: E402
from multidevice import run_checks, run_report  # noqa: E402
from dsv4_jax.model import kernel_sharding  # noqa: E402
from pallas_kernels.compress import block_slots  # noqa: E402

OLD_INTERPRETER = tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 11)  # see check_tpu_interpret
MESHES = {"2x2x2x1": (2, 2, 2, 1), "1x2x1x4": (1, 2, 1, 4), "2x1x1x4": (2, 1, 1, 4)}
OPS = ("sparse_attention", "indexer_topk", "compress")
B = 8


# ----- the ops on small random inputs ---------------------------------------------------------------------------
def sparse_attention_case(batch, impl, rng):
  S, H, D, T, K = 8, 4, 64, 16, 8
  args = (rng.standard_normal((batch, S, H, D)), rng.standard_normal((batch, T, D)), rng.standard_normal((H,)),
          rng.integers(-1, T, (batch, S, K)))
  fn = functools.partial(pallas_kernels.sparse_attention, scale=0.2, implementation=impl)
  return dict(fn=fn, args=args, dtypes="fffi", layouts=("BSHD", "BTD", "H", "BSK"), outs=("BSHD", "BSH"),
              split_heads=True, heads=H)


def indexer_topk_case(batch, impl, rng):
  S, H, D, N = 16, 4, 32, 8
  t = np.arange(S)
  end = np.broadcast_to(np.minimum((t + 1) // 2, N), (batch, S))
  start = np.broadcast_to(np.where(t >= 8, 2, 0), (batch, S))  # a second document from query 8 on
  args = (rng.standard_normal((batch, S, H, D)), rng.standard_normal((batch, N, D)),
          rng.standard_normal((batch, S, H)), end, start)
  fn = lambda q, k, w, end, start: pallas_kernels.indexer_topk(q, k, w, end, visible_start=start, topk=4,
                                                               implementation=impl)
  return dict(fn=fn, args=args, dtypes="fffii", layouts=("BSHD", "BND", "BSH", "BS", "BS"), outs=("BSK", "BSK"))


def compress_case(batch, impl, rng):
  S, c, m = 16, 32, 4
  positions = np.broadcast_to(np.arange(S), (batch, S))
  segment = np.broadcast_to((np.arange(S) >= 9).astype(np.int32), (batch, S))  # packed: a document from 9 on
  end, has_prev, pos = map(np.asarray, block_slots(jnp.asarray(positions), jnp.asarray(segment), m))
  args = (rng.standard_normal((batch, S, 2 * c)), rng.standard_normal((batch, S, 2 * c)),
          0.5 * rng.standard_normal((m, 2 * c)), 1 + 0.2 * rng.standard_normal((c,)), end, has_prev, pos)
  fn = functools.partial(pallas_kernels.compress, ratio=m, rope_freqs=10000.0 ** -(np.arange(8) / 8), eps=1e-6,
                         implementation=impl)
  return dict(fn=fn, args=args, dtypes="ffffibi", layouts=("BSC", "BSC", "RC", "C", "BN", "BN", "BN"), outs="BNC")


CASES = {"sparse_attention": sparse_attention_case, "indexer_topk": indexer_topk_case, "compress": compress_case}


def make_case(op, batch=B, impl="reference", seed=0):
  case = CASES[op](batch, impl, np.random.default_rng(seed))
  cast = {"f": jnp.float32, "i": jnp.int32, "b": jnp.bool_}
  case["args"] = tuple(jnp.asarray(a, cast[d]) for a, d in zip(case["args"], case["dtypes"]))
  case["diff"] = tuple(i for i, d in enumerate(case["dtypes"]) if d == "f")
  case["impl"] = impl
  return case


def value_and_grads(case, wrapped: bool):
  """f(*args) -> (outputs, d(Σ float outputs · probes)/d(float args)); probes fixed per op."""
  def call(*args):
    if not wrapped:
      return case["fn"](*args)
    return kernel_sharding.per_shard("test_op", case["fn"], args, case["layouts"], case["outs"],
                                     implementation=case["impl"], split_heads=case.get("split_heads", False),
                                     heads=case.get("heads"))

  def f(*args):
    def loss(*diff):
      full = list(args)
      for i, a in zip(case["diff"], diff):
        full[i] = a
      y = call(*full)
      ys = y if isinstance(y, tuple) else (y,)
      total = 0.0
      for n, o in enumerate(ys):
        if jnp.issubdtype(o.dtype, jnp.floating):
          probe = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape) * (0.7 + n))
          total += jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0) * probe)
      return total, y
    (_, y), g = jax.value_and_grad(loss, argnums=tuple(range(len(case["diff"]))), has_aux=True)(
        *(args[i] for i in case["diff"]))
    return y, g
  return f


# ----- the subprocess (8 CPU devices) ---------------------------------------------------------------------------
def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  fin = np.isfinite(b)
  if not np.array_equal(fin, np.isfinite(a)):
    return float("inf")
  a, b = np.where(fin, a, 0), np.where(fin, b, 0)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def tree_rel_diff(a, b) -> float:
  return max(rel_diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def placed(case, mesh):
  """The args on `mesh`: batch-major args split over the batch axes where they divide B, the rest replicated."""
  out = []
  for a, layout in zip(case["args"], case["layouts"]):
    ok = layout.startswith("B") and a.shape[0] % np.prod([mesh.shape[x] for x in sharding.BATCH_AXES]) == 0
    out.append(jax.device_put(a, sharding.batch_sharding(mesh, a.ndim) if ok else NamedSharding(mesh, P())))
  return out


def run_on_mesh(case, mesh, *, force=True):
  """(outputs, grads, compiled HLO text, whether the lowered jit has a shard_map region, the shapes of the first
  operand the op was traced with) of the wrapped op jitted under `mesh` as the abstract mesh."""
  seen = []
  op = case["fn"]
  case = {**case, "fn": lambda *a: seen.append(a[0].shape) or op(*a)}
  f = value_and_grads(case, wrapped=True)

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      if force:
        with kernel_sharding.force():
          return f(*args)
      return f(*args)
  args = placed(case, mesh)
  lowered = jax.jit(traced).lower(*args)
  compiled = lowered.compile()
  y, g = compiled(*args)
  return y, g, compiled.as_text(), "sdy.manual_computation" in lowered.as_text(), [list(x) for x in seen]


def plain(case):
  on0 = [jax.device_put(a, jax.devices()[0]) for a in case["args"]]
  return jax.jit(value_and_grads(case, wrapped=False))(*on0)


def compare(y, g, ref):
  ry, rg = ref
  ys, rys = jax.tree.leaves(y), jax.tree.leaves(ry)
  exact_ints = all(np.array_equal(a, b) for a, b in zip(ys, rys) if not jnp.issubdtype(b.dtype, jnp.floating))
  return {"out": tree_rel_diff(y, ry), "grads": tree_rel_diff(g, rg), "ints_equal": exact_ints}


def check_ops(report):
  out = {}
  for op in OPS:
    case = make_case(op)
    ref = plain(case)
    for name, shape in MESHES.items():
      y, g, hlo, manual, seen = run_on_mesh(case, sharding.make_mesh(*shape))
      out[f"{op}/{name}"] = {**compare(y, g, ref), "all_gather": hlo.count("all-gather("), "manual": manual,
                             "shape": list(case["args"][0].shape), "seen": seen}
  report["ops"] = out


def check_tpu_interpret(report):
  """sparse_attention with the TPU kernel (interpret mode) wrapped, against the plain reference; and the plain TPU
  call under the same mesh (GSPMD cannot split the kernel: it gathers). Not on jax < 0.11: there the TPU
  interpreter's cross-device barrier deadlocks under shard_map on CPU devices (seen with jax 0.10.2)."""
  if OLD_INTERPRETER:
    report["tpu"] = {"skipped": f"jax {jax.__version__}: the TPU interpreter deadlocks across CPU devices"}
    return
  mesh = sharding.make_mesh(*MESHES["2x1x1x4"])  # batch over data, heads over tensor
  case = make_case("sparse_attention", impl="tpu")
  y, g, hlo, manual, seen = run_on_mesh(case, mesh, force=False)
  out = {**compare(y, g, plain(make_case("sparse_attention"))), "all_gather": hlo.count("all-gather("),
         "manual": manual, "seen": seen}
  # The plain TPU-interpret call under GSPMD: forward only (the gathers show there already).
  compiled = jax.jit(lambda *a: case["fn"](*a)).lower(*placed(case, mesh)).compile()
  out["unwrapped_all_gather"] = compiled.as_text().count("all-gather(")
  report["tpu"] = out


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def check_fallback(report):
  """B = 3 (no batch axis divides it): the plain call, one warning; B = 4 on 2x2x2x1: split over data, fsdp."""
  handler = _Collect()
  logging.getLogger(kernel_sharding.__name__).addHandler(handler)
  out = {}
  mesh = sharding.make_mesh(*MESHES["2x2x2x1"])
  for batch in (3, 4):
    kernel_sharding._warned.clear()
    case = make_case("sparse_attention", batch=batch, seed=batch)
    ref = plain(case)
    y, g, _, manual, seen = run_on_mesh(case, mesh)
    run_on_mesh(case, mesh)  # a second trace: no second warning
    out[str(batch)] = {**compare(y, g, ref), "warnings": list(handler.messages), "manual": manual, "seen": seen}
    handler.messages.clear()
  report["fallback"] = out


def check_explicit(report):
  """compress on a mesh of Explicit axes (jax.set_mesh): the wrapper reshards its operands to its specs."""
  case = make_case("compress")
  mesh = jax.make_mesh(MESHES["2x2x2x1"], sharding.MESH_AXES, axis_types=(AxisType.Explicit,) * 4)
  f = value_and_grads(case, wrapped=True)

  def forced(*args):
    with kernel_sharding.force():
      return f(*args)
  with jax.set_mesh(mesh):
    args = placed(case, mesh)
    lowered = jax.jit(forced).lower(*args)
    y, g = lowered.compile()(*args)
  report["explicit"] = {**compare(y, g, plain(case)), "manual": "sdy.manual_computation" in lowered.as_text()}


def check_model(report):
  """A one-layer CSA tiny model (all three ops): forward under a 2x2x2x1 mesh with the ops per shard (the reference
  forced through the wrapper: the TPU kernels in interpret mode take ~50 s here) vs the unmeshed forward."""
  from flax import nnx

  from dsv4_jax.config import ModelConfig
  from dsv4_jax.model.transformer import DeepSeekV4
  from dsv4_jax.train.loop import traced_under
  cfg = ModelConfig.preset("tiny", num_hidden_layers=1, compress_ratios=(4,), num_nextn_predict_layers=0,
                           num_hash_layers=0)
  rng = np.random.default_rng(3)
  S = 32
  tokens = rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
  segment = np.broadcast_to((np.arange(S) >= 20).astype(np.int32), (B, S))
  from conftest import random_model
  state = nnx.state(random_model(cfg, seed=3))

  def forward(attention_impl):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(cfg.replace(attention_impl=attention_impl),
                                                              rngs=nnx.Rngs(0))))
    return lambda state, tokens, segment: nnx.merge(graphdef, state)(tokens, segment_ids=segment).logits
  ref = jax.jit(forward("reference"))(state, jnp.asarray(tokens), jnp.asarray(segment))
  mesh = sharding.make_mesh(*MESHES["2x2x2x1"])
  st = jax.device_put(state, sharding.state_shardings(state, mesh))
  bs = sharding.batch_sharding(mesh)
  args = (st, jax.device_put(tokens, bs), jax.device_put(segment, bs))

  def forced(*args):
    with kernel_sharding.force():
      return forward("reference")(*args)
  lowered = jax.jit(traced_under(mesh, forced)).lower(*args)
  got = lowered.compile()(*args)
  report["model"] = {"logits": rel_diff(got, ref),
                     "manual_regions": lowered.as_text().count("sdy.manual_computation(")}


def main():
  run_checks((check_ops, check_tpu_interpret, check_fallback, check_explicit, check_model))


# ----- the tests ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
  return run_report(__file__)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mesh", MESHES)
def test_op_per_shard_equals_plain(report, op, mesh):
  assert report["devices"] == 8
  r = report["ops"][f"{op}/{mesh}"]
  assert r["out"] < 1e-5 and r["grads"] < 1e-5 and r["ints_equal"], r
  assert r["all_gather"] == 0, r  # every device computes its own rows only
  tensor = MESHES[mesh][3]
  local = list(r["shape"])  # the op traced on one device's shard: B over the batch axes, heads over "tensor"
  local[0] //= 8 // tensor
  if op == "sparse_attention":
    local[2] //= tensor
  assert r["manual"] and r["seen"][-1] == local, r


def test_tpu_kernel_per_shard(report):
  """implementation="tpu" (interpret mode) is wrapped without force(): per shard on 2x1x1x4, the reference's
  values and gradients."""
  r = report["tpu"]
  if "skipped" in r:
    pytest.skip(r["skipped"])
  assert r["out"] < 1e-4 and r["grads"] < 1e-4, r
  assert r["all_gather"] == 0 and r["manual"], r
  assert r["seen"][-1] == [4, 8, 1, 64], r  # q's shard: B 8 / data 2, H 4 / tensor 4


def test_plain_kernel_under_gspmd_gathers(report):
  """What the wrapper removes: the unwrapped kernel under the same mesh gathers its operands."""
  if "skipped" in report["tpu"]:
    pytest.skip(report["tpu"]["skipped"])
  assert report["tpu"]["unwrapped_all_gather"] > 0


def test_batch_not_divisible_falls_back_with_one_warning(report):
  r = report["fallback"]["3"]
  assert r["out"] < 1e-5 and r["grads"] < 1e-5, r
  assert not r["manual"] and r["seen"][-1][0] == 3, r
  assert len(r["warnings"]) == 1 and "test_op" in r["warnings"][0] and "batch 3" in r["warnings"][0], r


def test_batch_split_over_the_axes_that_divide_it(report):
  r = report["fallback"]["4"]
  assert r["out"] < 1e-5 and r["grads"] < 1e-5 and r["manual"] and r["seen"][-1][0] == 1, r
  assert len(r["warnings"]) == 1 and "['data', 'fsdp']" in r["warnings"][0], r


def test_explicit_mesh(report):
  r = report["explicit"]
  assert r["out"] < 1e-5 and r["grads"] < 1e-5 and r["manual"], r


def test_model_forward_per_shard_on_a_mesh(report):
  r = report["model"]
  assert r["manual_regions"] == 4, r  # sparse_attention, indexer_topk, the attention's and the indexer's compress
  assert r["logits"] < 1e-5, r


def test_plan():
  mesh = AbstractMesh((2, 2, 2, 4), sharding.MESH_AXES)
  assert kernel_sharding.plan(8, 8, mesh) == (("data", "fsdp", "expert"), True)
  assert kernel_sharding.plan(16, 6, mesh) == (("data", "fsdp", "expert"), False)
  assert kernel_sharding.plan(8, None, mesh) == (("data", "fsdp", "expert"), False)
  assert kernel_sharding.plan(8, 8, AbstractMesh((1, 8, 1, 1), sharding.MESH_AXES)) == (("fsdp",), False)


def test_without_mesh_or_kernel_it_is_the_plain_call():
  """No shard_map without a mesh context (even forced), nor for a pure-JAX implementation under one."""
  case = make_case("compress", batch=2)
  call = lambda impl: (lambda *a: kernel_sharding.per_shard("compress", case["fn"], a, case["layouts"], case["outs"],
                                                            implementation=impl))
  with kernel_sharding.force():
    assert "shard_map" not in str(jax.make_jaxpr(call("tpu"))(*case["args"]))
  for types in (AxisType.Auto, AxisType.Explicit):
    mesh = AbstractMesh((1, 2, 1, 1), sharding.MESH_AXES, axis_types=(types,) * 4)
    with jax.sharding.use_abstract_mesh(mesh):
      assert "shard_map" not in str(jax.make_jaxpr(call("reference"))(*case["args"]))
      assert "shard_map" in str(jax.make_jaxpr(call("tpu"))(*case["args"]))
  assert kernel_sharding.is_kernel("tpu") and not kernel_sharding.is_kernel("reference")
  assert kernel_sharding.is_kernel("auto") == (jax.default_backend() in ("tpu", "gpu"))


def _aot_compile(op, mesh, wrapped: bool):
  """The op's forward + gradient (TPU kernels) jitted under `mesh` and compiled for its TPU topology."""
  from pallas_kernels.sparse_attention.tpu import compile_for_tpu
  case = make_case(op, impl="tpu")
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.batch_sharding(mesh, a.ndim) if layout[0] == "B"
                               else NamedSharding(mesh, P())) for a, layout in zip(case["args"], case["layouts"])]
  f = value_and_grads(case, wrapped)

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return f(*args)
  with compile_for_tpu(), jax.default_matmul_precision("default"):
    return jax.jit(traced).lower(*args).compile().as_text()


def test_aot_compile_for_v5p_runs_the_kernels_per_shard():
  """v5p:2x2x2 as a (data 2, tensor 4) mesh: each op's Mosaic kernels (forward and backward) see B / 2 rows, the
  attention kernels H / 4 heads; no all-gather."""
  pytest.importorskip("aot_util")  # skips without libtpu
  from jax.experimental import topologies
  mesh = sharding.make_mesh(2, 1, 1, 4, devices=topologies.get_topology_desc("v5p:2x2x2", "tpu").devices)
  for op in OPS:
    hlo = _aot_compile(op, mesh, wrapped=True)
    calls = re.findall(r"%(\w+)\.\d+ = (.*?) custom-call\(.*custom_call_target=\"tpu_custom_call\"", hlo)
    shapes = {name: [[int(d) for d in dims.split(",")] for dims in re.findall(r"\w+\[([\d,]+)\]", result)]
              for name, result in calls}  # kernel name -> its results' shapes
    assert len(shapes) == (1 if op == "indexer_topk" else 2) and hlo.count("all-gather(") == 0, (op, shapes)
    assert all(dims[0] == B // 2 for result in shapes.values() for dims in result), (op, shapes)
    if op == "sparse_attention":
      assert shapes["sparse_attention_fwd"][0][:3] == [B // 2, 8, 1], shapes  # [B/2, S, H/4, D padded]


def test_aot_compile_unwrapped_kernel_is_rejected():
  """Why the wrapper is needed on a TPU pod: the plain Mosaic call under a sharded jit does not compile."""
  pytest.importorskip("aot_util")
  from jax.experimental import topologies
  mesh = sharding.make_mesh(2, 1, 1, 4, devices=topologies.get_topology_desc("v5p:2x2x2", "tpu").devices)
  with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
    _aot_compile("sparse_attention", mesh, wrapped=False)


if __name__ == "__main__":
  main()
