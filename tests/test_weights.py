"""Checkpoint I/O: safetensors reader/writer, load_pretrained / save_pretrained / load_official_state.

The fixture checkpoint is written straight from random official tensors (no model init, which takes ~20 s on
the CPU): load it, check every variable against `to_ours` of its tensor, save, compare the files bit for bit.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dsv4_jax import DeepSeekV4, ModelConfig
from dsv4_jax import safetensors_io as stio
from dsv4_jax import weights
from dsv4_jax.model.quant import dequant_fp4_packed, dequant_fp8_blocks, quant_fp4_packed, quant_fp8_blocks
from dsv4_jax.official_names import official_tensors, to_ours
from dsv4_jax.weights import CheckpointError, load_official_state, load_pretrained, save_pretrained

CFG = ModelConfig.preset("tiny")


def _official(cfg, seed=0):
  """Random official tensors (float32; tid2eid int64 with distinct experts per row) and the abstract model."""
  abstract = nnx.eval_shape(lambda: DeepSeekV4(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  out = {}
  for s in official_tensors(abstract):
    if s.layout[0] == "int32":
      out[s.name] = np.argsort(rng.random((s.shape[0], cfg.n_routed_experts)), axis=1)[:, :s.shape[1]]
    else:
      out[s.name] = rng.standard_normal(s.shape).astype(np.float32)
  return out, abstract


def _write(path, tensors, config=None, *, max_shard_bytes=1 << 20, index=True):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config if config is not None else CFG.to_hf(quantized=False), f)
  items = [(k, v.dtype, v.shape) for k, v in tensors.items()]
  stio.write_sharded(str(path), items, tensors.__getitem__, max_shard_bytes)
  if not index:
    os.remove(os.path.join(path, stio.INDEX_NAME))
  return str(path)


def _expected(spec, tensors):
  return to_ours(tensors[spec.name], spec.layout)


def _values(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_matches(model, specs, want, dtype=None):
  values = _values(model)
  for s in specs:
    got = values[s.path][s.index] if s.index else values[s.path]
    exp = want(s)
    exp = exp.astype(dtype or got.dtype) if got.dtype != np.int32 else exp
    assert got.dtype == exp.dtype and np.array_equal(got, exp), s.name


@pytest.fixture(scope="module")
def official():
  return _official(CFG)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, official):
  return _write(tmp_path_factory.mktemp("ck") / "tiny", official[0])


@pytest.fixture(scope="module")
def loaded(ckpt):
  return load_pretrained(ckpt, dtype="float32", progress=False)


# ----- safetensors_io ------------------------------------------------------------------------------------
def test_safetensors_every_dtype_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {code: rng.integers(0, 255, (3, 5), np.uint8).view(dt) if dt.itemsize == 1 and code != "BOOL"
             else rng.standard_normal((2, 3)).astype(dt) for code, dt in stio.DTYPES.items()}
  tensors["BOOL"] = rng.random((4,)) < 0.5
  tensors["F8_E8M0"] = np.arange(120, 135, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)  # no 0xFF (NaN)
  tensors["empty"] = np.zeros((0, 4), np.float32)
  stio.save_file(tensors, tmp_path / "a.safetensors")
  infos = stio.read_header(str(tmp_path / "a.safetensors"))
  back = stio.load_file(str(tmp_path / "a.safetensors"))
  for k, v in tensors.items():
    assert infos[k].dtype == v.dtype and back[k].shape == v.shape
    assert back[k].tobytes() == v.tobytes(), k


def test_safetensors_reader_agrees_with_the_safetensors_package(tmp_path):
  from safetensors.numpy import load_file, save_file  # noqa: PLC0415

  tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64)}
  save_file(tensors, str(tmp_path / "theirs.safetensors"))
  for k, v in stio.load_file(str(tmp_path / "theirs.safetensors")).items():
    assert np.array_equal(v, tensors[k])
  stio.save_file(tensors, tmp_path / "ours.safetensors")
  for k, v in load_file(str(tmp_path / "ours.safetensors")).items():
    assert np.array_equal(v, tensors[k])


def test_safetensors_rejects_corrupt_files(tmp_path):
  p = tmp_path / "x.safetensors"
  stio.save_file({"a": np.zeros((4, 4), np.float32)}, p)
  raw = p.read_bytes()
  p.write_bytes(raw[:-4])  # data shorter than the header says
  with pytest.raises(stio.SafetensorsError, match="'a'.*data_offsets"):
    stio.read_header(str(p))
  p.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
  with pytest.raises(stio.SafetensorsError, match="header length"):
    stio.read_header(str(p))


# ----- load_pretrained -----------------------------------------------------------------------------------
def test_load_gives_every_official_tensor_in_our_layout(loaded, official):
  model, cfg = loaded
  tensors, abstract = official
  assert cfg == CFG
  _assert_matches(model, official_tensors(abstract), lambda s: _expected(s, tensors))


def test_load_casts_to_the_requested_dtype(ckpt, official):
  model, cfg = load_pretrained(ckpt, progress=False)  # default: bfloat16 storage and compute
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  values = _values(model)
  assert values[("embed",)].dtype == ml_dtypes.bfloat16
  assert values[("hc_head", "fn")].dtype == np.float32  # kept float32 as the official code
  tensors, abstract = official
  _assert_matches(model, official_tensors(abstract), lambda s: _expected(s, tensors))
  assert load_pretrained(ckpt, dtype=None, progress=False)[1] == CFG  # as config.json says
  _, cfg = load_pretrained(ckpt, dtype="bfloat16", param_dtype="float32", progress=False)
  assert (cfg.param_dtype, cfg.dtype) == ("float32", "bfloat16")  # explicit fields win


def test_load_without_index_json(tmp_path, official):
  path = _write(tmp_path / "noindex", official[0], index=False)
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
  model, _ = load_pretrained(path, dtype="float32", progress=False)
  _assert_matches(model, official_tensors(official[1]), lambda s: _expected(s, official[0]))


def test_load_dequantizes_fp8_and_fp4(tmp_path, official):
  """FP8 (128x128 blocks) for the release's FP8 weights, FP4 pairs for routed experts, and FP8 experts for
  one layer (Base-model format): loaded values equal the dequantized ones exactly."""
  tensors, abstract = official
  quantized, dequantized = dict(tensors), {}
  for s in official_tensors(abstract):
    fp8 = s.fp8_in_release or (s.expert and s.name.startswith("layers.1."))
    if not (fp8 or s.expert):
      continue
    q, scale = (quant_fp8_blocks if fp8 else quant_fp4_packed)(tensors[s.name])
    quantized[s.name], quantized[s.name[:-len("weight")] + "scale"] = q, scale
    dequantized[s.name] = (dequant_fp8_blocks if fp8 else dequant_fp4_packed)(q, scale)
    assert not np.array_equal(dequantized[s.name], tensors[s.name])  # the test would be vacuous otherwise
  assert quantized["layers.0.ffn.experts.0.w1.weight"].dtype == np.int8
  assert quantized["layers.1.ffn.experts.0.w1.weight"].dtype == ml_dtypes.float8_e4m3fn
  path = _write(tmp_path / "q", quantized, CFG.replace(expert_dtype="fp4").to_hf(quantized=True))
  infos = stio.CheckpointFiles(path).infos
  assert infos["layers.0.attn.wq_a.scale"].dtype == ml_dtypes.float8_e8m0fnu
  model, cfg = load_pretrained(path, dtype="float32", progress=False)
  assert cfg.weight_quant == "fp8" and cfg.expert_dtype == "fp4"
  _assert_matches(model, official_tensors(abstract),
                  lambda s: to_ours(dequantized.get(s.name, tensors[s.name]), s.layout))


def _corrupt(tensors, name=None, value=None, drop=None):
  t = dict(tensors)
  if drop:
    del t[drop]
  if name:
    t[name] = value
  return t


def _bad_cases(tensors):
  wq_a = tensors["layers.0.attn.wq_a.weight"]
  q, s = quant_fp8_blocks(wq_a)
  w1 = tensors["layers.0.ffn.experts.3.w1.weight"]
  q4, s4 = quant_fp4_packed(w1)
  hash_dup = tensors["layers.0.ffn.gate.tid2eid"].copy()
  hash_dup[7] = [3, 3]
  hash_range = tensors["layers.0.ffn.gate.tid2eid"].copy()
  hash_range[9] = [1, 8]
  return {
    "missing": (_corrupt(tensors, drop="layers.2.attn.wo_b.weight"),
                ["missing", "layers.2.attn.wo_b.weight", "[64, 64]"]),
    "unexpected": (_corrupt(tensors, "layers.0.attn.foo.weight", np.zeros((3, 4), np.float32)),
                   ["unexpected", "layers.0.attn.foo.weight", "[3, 4]"]),
    "wrong shape": (_corrupt(tensors, "layers.1.attn.wq_b.weight", np.zeros((512, 31), np.float32)),
                    ["wrong shape", "layers.1.attn.wq_b.weight", "[512, 32]", "[512, 31]"]),
    "wrong fp8 scale shape": (
      {**_corrupt(tensors, "layers.0.attn.wq_a.weight", q), "layers.0.attn.wq_a.scale": np.tile(s, (2, 1))},
      ["layers.0.attn.wq_a.scale", "expected [1, 1]", "[2, 1]", "[32, 64]"]),
    "wrong fp4 shape": (
      {**_corrupt(tensors, "layers.0.ffn.experts.3.w1.weight", q4[:, :31]),
       "layers.0.ffn.experts.3.w1.scale": s4},
      ["layers.0.ffn.experts.3.w1.weight", "[32, 32]", "[32, 31]", "[32, 64]"]),
    "wrong fp4 scale shape": (
      {**_corrupt(tensors, "layers.0.ffn.experts.3.w1.weight", q4), "layers.0.ffn.experts.3.w1.scale": s4[:, :1]},
      ["layers.0.ffn.experts.3.w1.scale", "expected [32, 2]", "[32, 1]"]),
    "fp8 without scale": (_corrupt(tensors, "layers.0.attn.wq_a.weight", q),
                          ["layers.0.attn.wq_a.weight", "without its scale", "[32, 64]"]),
    "scale on a bf16 tensor": (_corrupt(tensors, "layers.0.attn_norm.scale", np.ones((1,), np.float32)),
                               ["unexpected", "layers.0.attn_norm.scale", "never quantizes"]),
    "duplicate hash experts": (_corrupt(tensors, "layers.0.ffn.gate.tid2eid", hash_dup),
                               ["layers.0.ffn.gate.tid2eid", "(layers.0)", "token 7", "[3, 3]", "once", "twice"]),
    "hash expert out of range": (_corrupt(tensors, "layers.0.ffn.gate.tid2eid", hash_range),
                                 ["layers.0.ffn.gate.tid2eid", "token 9", "[1, 8]", "[0, 8)"]),
  }


@pytest.fixture
def no_allocation(monkeypatch):
  """Any device allocation by the loader fails the test."""
  def boom(*a, **k):
    raise AssertionError("allocated before validation finished")

  monkeypatch.setattr(weights, "_allocate", boom)
  monkeypatch.setattr(weights, "_put", boom)
  monkeypatch.setattr(weights, "stream", boom)


BAD_CASES = ["missing", "unexpected", "wrong shape", "wrong fp8 scale shape", "wrong fp4 shape",
             "wrong fp4 scale shape", "fp8 without scale", "scale on a bf16 tensor", "duplicate hash experts",
             "hash expert out of range"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_checkpoint_fails_before_allocation(case, tmp_path, official, no_allocation):
  tensors, fragments = _bad_cases(official[0])[case]
  path = _write(tmp_path / "bad", tensors)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(path, dtype="float32", progress=False)
  for fragment in fragments:
    assert fragment in str(e.value), (fragment, str(e.value))
  with pytest.raises(CheckpointError):  # the in-memory path validates the same way
    load_official_state(nnx.eval_shape(lambda: DeepSeekV4(CFG, rngs=nnx.Rngs(0))), tensors)


def test_many_problems_are_counted_and_capped(tmp_path, official, no_allocation):
  tensors = {k: v for k, v in official[0].items() if ".experts." not in k}
  tensors["layers.0.attn.foo.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(_write(tmp_path / "bad", tensors), dtype="float32", progress=False)
  n, msg = sum(".experts." in k for k in official[0]), str(e.value)
  assert f"{n} missing, 1 unexpected" in msg and f"and {n - weights.MAX_LISTED} more missing" in msg
  assert "unexpected: layers.0.attn.foo.weight: F32 [2, 2]" in msg  # not hidden behind the missing ones
  assert len(msg.splitlines()) == 1 + weights.MAX_LISTED + 1 + 1


def test_missing_config_json(tmp_path, ckpt, no_allocation):
  os.makedirs(tmp_path / "c")
  for f in os.listdir(ckpt):
    if f != "config.json":
      os.link(os.path.join(ckpt, f), tmp_path / "c" / f)
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(tmp_path / "c", progress=False)


def test_index_disagreeing_with_files(tmp_path, official):
  path = _write(tmp_path / "ix", official[0])
  index = json.load(open(os.path.join(path, stio.INDEX_NAME)))
  wm = index["weight_map"]
  wm["embed.weight"] = next(f for f in wm.values() if f != wm["embed.weight"])
  json.dump(index, open(os.path.join(path, stio.INDEX_NAME), "w"))
  with pytest.raises(stio.SafetensorsError, match="embed.weight"):
    load_pretrained(path, progress=False)


# ----- save_pretrained -----------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(tmp_path, loaded, official):
  model, cfg = loaded
  out = str(tmp_path / "saved")
  save_pretrained(model, cfg, out, max_shard_bytes=1 << 20, progress=False)
  files = stio.CheckpointFiles(out)
  assert len(files.files) > 1
  assert json.load(open(os.path.join(out, "config.json"))) == cfg.to_hf(quantized=False)
  assert set(files.infos) == set(official[0])
  for name, want in official[0].items():  # the files hold the official tensors, bit for bit
    got = files.get(name)
    assert got.dtype == want.dtype and np.array_equal(got, want), name
  model2, cfg2 = load_pretrained(out, dtype="float32", progress=False)
  assert cfg2 == cfg
  a, b = _values(model), _values(model2)
  assert a.keys() == b.keys()
  for p in a:
    assert a[p].dtype == b[p].dtype and np.array_equal(a[p], b[p]), p
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 20)), jnp.int32)
  forward = nnx.jit(lambda m, t: m(t).logits)
  assert np.array_equal(np.asarray(forward(model, tokens)), np.asarray(forward(model2, tokens)))


def test_save_refuses_to_clobber(tmp_path, loaded, monkeypatch):
  model, cfg = loaded
  out = tmp_path / "dir"
  os.makedirs(out)
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_pretrained(model, cfg, out, progress=False)
  monkeypatch.setattr(weights, "write_sharded", lambda *a, **k: 1 / 0)  # a failure half-way
  with pytest.raises(ZeroDivisionError):
    save_pretrained(model, cfg, out, overwrite=True, progress=False)
  assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["dir"]  # untouched, no temp left
  monkeypatch.undo()
  save_pretrained(model, cfg, out, overwrite=True, progress=False)
  assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
  assert sorted(os.listdir(tmp_path)) == ["dir"]
  with pytest.raises(ValueError, match="hidden_size"):
    save_pretrained(model, cfg.replace(hidden_size=128), tmp_path / "other", progress=False)


def test_load_official_state_with_prefix(loaded, official):
  model, _ = loaded
  tensors, abstract = official
  shifted = {f"param/{k}": (v + 1 if v.dtype == np.float32 else v) for k, v in tensors.items()}
  shifted["other/ignored"] = np.zeros(3)
  before = _values(model)
  load_official_state(model, shifted, prefix="param/")
  _assert_matches(model, official_tensors(abstract), lambda s: _expected(s, {s.name: shifted["param/" + s.name]}))
  load_official_state(model, tensors)  # restore for the other tests
  after = _values(model)
  assert all(np.array_equal(before[p], after[p]) for p in before)


# ----- sharded load --------------------------------------------------------------------------------------
_MESH_SCRIPT = textwrap.dedent("""
  import sys
  import numpy as np
  import jax
  from flax import nnx
  from dsv4_jax.sharding import make_mesh, state_shardings
  from dsv4_jax.safetensors_io import CheckpointFiles
  from dsv4_jax.weights import load_pretrained, save_pretrained

  assert jax.device_count() == 8, jax.devices()
  mesh = make_mesh(data=1, fsdp=2, expert=2, tensor=2)
  model, cfg = load_pretrained(sys.argv[1], dtype="float32", mesh=mesh, progress=False)
  plain, _ = load_pretrained(sys.argv[1], dtype="float32", progress=False)
  state = nnx.state(model)
  want = dict(nnx.to_flat_state(state_shardings(state, mesh)))
  ref = dict(nnx.to_flat_state(nnx.state(plain)))
  sharded = 0
  for path, v in nnx.to_flat_state(state):
    x, w = v.get_value(), want[path].get_value()
    assert x.sharding == w, (path, x.sharding, w)
    assert np.array_equal(np.asarray(x), np.asarray(ref[path].get_value())), path
    sharded += not x.sharding.is_fully_replicated
  assert sharded > 50, sharded
  out = sys.argv[2] + "/resaved"
  save_pretrained(model, cfg, out, progress=False)  # gathers the shards back
  ours, theirs = CheckpointFiles(out), CheckpointFiles(sys.argv[1])
  assert set(ours.infos) == set(theirs.infos)
  for name in theirs.infos:
    assert np.array_equal(ours.get(name), theirs.get(name)), name
  print("ok", sharded)
""")


def test_load_onto_an_8_device_mesh_and_save_back(ckpt, tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, ckpt, str(tmp_path)], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
