"""Training checkpoints (dsv4_jax/train/checkpoint.py): bit-exact round trips, async writes, retention, the NaN
guard, clear errors, the resume compatibility check, and restoring onto other shardings (4 host devices)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv4_jax.train.checkpoint import (
  CheckpointNotFound, Checkpointer, IncompatibleCheckpoint, NonFiniteState, check_compatible)

META = {"model": {"hidden_size": 64, "compress_ratios": (0, 4, 128, 4, 0), "dtype": "float32"},
        "train": {"global_batch": 8, "seq_len": 32, "steps": 100, "log_every": 10}, "stability": {"skips": 0}}
DATA = {"iterator": {"epoch": 1, "index": [3, 5]}, "seed": 7}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: nnx.State
  opt_state: optax.OptState
  rest: nnx.State
  extra: dict
  step: jax.Array
  rng: jax.Array


def _randomize(tree, seed):
  """Float leaves random (so zero-initialised optimizer moments are checked too); others unchanged."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
    tree)


@pytest.fixture(scope="module")
def state(tiny_model):
  _, params, rest = nnx.split(tiny_model, nnx.Param, ...)
  labels = jax.tree.map(lambda x: "decay" if x.ndim > 1 else "plain", params)
  tx = optax.multi_transform({"decay": optax.adamw(1e-3), "plain": optax.adam(1e-3)}, labels)  # MaskedNodes
  return TrainState(
    params=params, opt_state=_randomize(tx.init(params), 1), rest=rest,
    extra={"bf16": jnp.asarray(np.random.default_rng(2).standard_normal((3, 5)), jnp.bfloat16)},
    step=jnp.int32(41), rng=jax.random.key_data(jax.random.key(3)))


def _abstract(tree, sharding=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)


def _assert_bit_exact(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def test_round_trip_bit_exact(state, tmp_path):
  assert state.extra["bf16"].dtype == jnp.bfloat16 and state.rng.dtype == jnp.uint32
  with Checkpointer(tmp_path / "ckpt", keep=3) as ckpt:  # creates the directory; async by default
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    assert ckpt.save(41, state, data_state=DATA, meta=META)
    restored, data, meta = ckpt.restore(abstract_state=_abstract(state))  # waits for the async write
  _assert_bit_exact(restored, state)
  assert isinstance(restored, TrainState) and isinstance(restored.params, nnx.State)
  assert all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  assert data == DATA
  assert meta["model"]["compress_ratios"] == [0, 4, 128, 4, 0] and meta["train"] == META["train"]


def test_async_save_then_wait(state, tmp_path):
  ckpt = Checkpointer(tmp_path, keep=3, async_save=True)
  assert ckpt.save(1, state, data_state=DATA, meta=META)
  ckpt.wait()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # committed: renamed from its tmp directory
  ckpt.close()
  with Checkpointer(tmp_path) as again:  # a fresh manager (a resumed run) sees and restores it
    assert again.latest_step() == 1
    _assert_bit_exact(again.restore(1, abstract_state=_abstract(state))[0], state)


def test_keep_two_and_stale_steps(state, tmp_path):
  with Checkpointer(tmp_path, keep=2) as ckpt:
    for step in (1, 2, 3):
      assert ckpt.save(step, state, data_state={"step": step}, meta=META)
    assert not ckpt.save(3, state, data_state=DATA, meta=META)  # not after the latest step: skipped
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    assert ckpt.restore(2, abstract_state=_abstract(state))[1] == {"step": 2}
  assert sorted(int(p.name) for p in tmp_path.iterdir()) == [2, 3]


def test_nan_refused_and_previous_untouched(state, tmp_path):
  with Checkpointer(tmp_path, keep=1) as ckpt:  # keep=1: a save that went ahead would delete step 1
    ckpt.save(1, state, data_state=DATA, meta=META)
    ckpt.wait()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    bad = state.extra["bf16"].at[2, 1].set(jnp.nan)
    with pytest.raises(NonFiniteState, match=r"extra\.bf16"):
      ckpt.save(2, dataclasses.replace(state, extra={"bf16": bad}), data_state=DATA, meta=META)
    (path, _), *_ = jax.tree_util.tree_flatten_with_path(state.params)[0]
    inf_params = jax.tree_util.tree_map_with_path(lambda p, x: x.at[(0,) * x.ndim].set(jnp.inf) if p == path else x,
                                                  state.params)
    name = "params." + ".".join(str(getattr(k, "key", getattr(k, "name", None))) for k in path)
    with pytest.raises(NonFiniteState, match=rf"{name} \(and 1 more leaves\)"):
      ckpt.save(2, dataclasses.replace(state, params=inf_params, extra={"bf16": bad}), data_state=DATA, meta=META)
    assert ckpt.all_steps() == [1]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    _assert_bit_exact(ckpt.restore(abstract_state=_abstract(state))[0], state)


def test_missing_step_and_empty_directory(state, tmp_path):
  with Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(CheckpointNotFound, match="no checkpoint in"):
      ckpt.restore(abstract_state=_abstract(state))
    with pytest.raises(FileNotFoundError):
      ckpt.read_meta()
  with Checkpointer(tmp_path / "two") as ckpt:
    small = {"x": jnp.arange(3.0)}
    ckpt.save(5, small, data_state={}, meta=META)
    ckpt.save(9, small, data_state={}, meta=META)
    with pytest.raises(CheckpointNotFound, match=r"step 7 .*existing steps: \[5, 9\]"):
      ckpt.restore(7, abstract_state=_abstract(small))


def test_restore_names_structure_shape_dtype_mismatch(tmp_path):
  saved = {"a": jnp.zeros((4,), jnp.float32), "b": {"c": jnp.zeros((2, 3), jnp.bfloat16)}, "gone": jnp.int32(1)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, saved, data_state={}, meta=META)
    wanted = {"a": jax.ShapeDtypeStruct((4,), jnp.bfloat16), "b": {"c": jax.ShapeDtypeStruct((2, 4), jnp.bfloat16)},
              "new": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(IncompatibleCheckpoint) as err:
      ckpt.restore(abstract_state=wanted)
  message = str(err.value)
  for part in ("gone: in the checkpoint, not in abstract_state", "new: in abstract_state, not in the checkpoint",
               "a: saved float32[4], now bfloat16[4]", "b.c: saved bfloat16[2, 3], now bfloat16[2, 4]"):
    assert part in message
  assert len(err.value.differences) == 4


def test_read_meta_reads_only_meta(state, tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state, data_state=DATA, meta=META)
    ckpt.save(4, state, data_state=DATA, meta={**META, "stability": {"skips": 2}})
  for step in (3, 4):  # without the arrays on disk, only the meta item can be read
    for item in (tmp_path / str(step) / "state").rglob("*"):
      if item.is_file():
        item.unlink()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.read_meta()["stability"] == {"skips": 2}
    assert ckpt.read_meta(3)["train"] == META["train"]


def test_stray_tmp_directory_is_not_a_step(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"x": jnp.ones(2)}, data_state={}, meta=META)
  crashed = tmp_path / "2.orbax-checkpoint-tmp-1234"  # what a save killed before its rename leaves behind
  (crashed / "state").mkdir(parents=True)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1


def test_json_items_checked_before_writing(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="data_state is not JSON-serialisable"):
      ckpt.save(1, {"x": jnp.ones(2)}, data_state={"bad": object()}, meta=META)
    assert ckpt.all_steps() == []


def test_check_compatible():
  same = {**META, "model": {**META["model"], "compress_ratios": [0, 4, 128, 4, 0]},  # list vs tuple: equal
          "train": {**META["train"], "steps": 500, "log_every": 1}, "stability": {"skips": 9}}
  check_compatible(META, same, critical_train_keys=("global_batch", "seq_len"))
  now = {"model": {"hidden_size": 128, "compress_ratios": (0, 4, 4), "vocab_size": 512},
         "train": {"global_batch": 8, "seq_len": 64, "steps": 1}}
  with pytest.raises(IncompatibleCheckpoint) as err:
    check_compatible(META, now, critical_train_keys=("global_batch", "seq_len"))
  assert err.value.differences == [
    "model.hidden_size: saved 64, now 128",
    "model.compress_ratios: saved [0, 4, 128, 4, 0], now [0, 4, 4]",
    "model.dtype: saved 'float32', now <absent>",
    "model.vocab_size: saved <absent>, now 512",
    "train.seq_len: saved 32, now 64",
  ]
  assert "5 fields differ" in str(err.value) and "model.hidden_size: saved 64, now 128" in str(err.value)


def test_restore_onto_explicit_sharding(state, tmp_path):
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  sharding = NamedSharding(mesh, P())
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state=DATA, meta=META)
    restored, _, _ = ckpt.restore(abstract_state=_abstract(state, sharding))
  assert all(x.sharding == sharding for x in jax.tree.leaves(restored))
  _assert_bit_exact(restored, state)


_FOUR_DEVICES = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from dsv4_jax.train.checkpoint import Checkpointer, NonFiniteState
  assert jax.device_count() == 4
  mesh = Mesh(np.array(jax.devices()), ("x",))
  row, col = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P(None, "x"))
  expected = np.load(sys.argv[2])
  with Checkpointer(sys.argv[1]) as ckpt:
    abstract = {"w": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=col),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
    state, data, _ = ckpt.restore(abstract_state=abstract)
    assert state["w"].sharding == col and len(state["w"].addressable_shards) == 4, state["w"].sharding
    assert np.asarray(state["w"]).tobytes() == expected.tobytes() and int(state["step"]) == 1
    w = jax.device_put(state["w"], row)
    try:
      ckpt.save(2, {"w": w.at[7, 0].set(jnp.inf), "step": state["step"]}, data_state=data, meta={})
      raise AssertionError("an Inf in the last shard was saved")
    except NonFiniteState as e:
      assert "w" in str(e)
    ckpt.save(2, {"w": w * 2, "step": state["step"] + 1}, data_state=data, meta={})
  print("OK")
""")


def test_restore_onto_four_way_sharding(tmp_path):
  """A 1-device save restored onto a 4-device mesh, and a 4-way sharded save restored on 1 device."""
  w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.bfloat16)
  np.save(tmp_path / "w.npy", np.asarray(w))
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, {"w": w, "step": jnp.int32(1)}, data_state=DATA, meta=META)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path / "ckpt"), str(tmp_path / "w.npy")],
                        env=env, capture_output=True, text=True, timeout=300,
                        cwd=pathlib.Path(__file__).resolve().parents[1])
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.all_steps() == [1, 2]
    state, data, _ = ckpt.restore(abstract_state={"w": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16),
                                                  "step": jax.ShapeDtypeStruct((), jnp.int32)})
  assert np.asarray(state["w"]).tobytes() == np.asarray(w * 2).tobytes() and int(state["step"]) == 2
  assert data == DATA
