"""unstack_layers: a scanned model with per-layer parameters gives the same logits (forward, MTP, prefill + decode
through the cache), the same parameters (checked tensor by tensor through the official names, an independent
mapping), and shares everything outside the main layers; a stacked checkpoint loads unstacked (load_pretrained,
the `dsv4 generate/serve` loader); slices keep their shardings (4 fake CPU devices, in a subprocess); serving a
scanned model logs a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax import cli, load_pretrained, save_pretrained, unstack_layers
from dsv4_jax.config import ModelConfig
from dsv4_jax.model.transformer import layer_plan
from dsv4_jax.official_names import official_tensors
from dsv4_jax.serve.steps import make_decode, make_prefill

# The tiny preset's layers never repeat (every stack has one repeat); this 5-layer variant has a stack of two
# repeats of a two-layer unit (CSA, HCA), so slices come from both the repeat and the position axes.
CFG = ModelConfig.preset("tiny", num_hidden_layers=5, compress_ratios=(0, 4, 128, 4, 128, 0))
PROMPTS, S = (130, 133), 140  # row 0's prompt crosses the first HCA block; decode crosses CSA blocks


def rel_errors(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


def flat_values(model):
  return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def models(model_factory):
  model = model_factory(CFG)
  return model, unstack_layers(model)


def test_config_and_plan(models):
  model, flat = models
  assert all(r == 1 for _, r in layer_plan(ModelConfig.preset("tiny")))  # why this file has its own config
  assert any(r > 1 and len(unit) > 1 for unit, r in model.plan), model.plan  # the precondition of this file
  assert model.cfg.scan_layers and len(model.stacks) < CFG.num_hidden_layers  # the input is unchanged
  assert flat.cfg == CFG.replace(scan_layers=False)
  assert flat.plan == tuple(layer_plan(flat.cfg)) and len(flat.stacks) == CFG.num_hidden_layers
  assert all(stack.repeats == 1 for stack in flat.stacks)


def test_parameters_are_the_slices(models):
  model, flat = models
  stacked, unstacked = flat_values(model), flat_values(flat)
  assert sum(x.size for x in stacked.values()) == sum(x.size for x in unstacked.values())
  specs_s, specs_u = official_tensors(model), official_tensors(flat)
  assert [s.name for s in specs_s] == [s.name for s in specs_u]
  for a, b in zip(specs_s, specs_u):
    np.testing.assert_array_equal(np.asarray(stacked[a.path])[a.index], np.asarray(unstacked[b.path])[b.index],
                                  err_msg=a.name)
  for path, x in unstacked.items():  # outside the main layers: the same arrays, not copies
    if path[0] != "stacks":
      assert x is stacked[path], path
  assert any(p[0] == "mtp" for p in unstacked)


def test_forward_and_mtp_logits_equal(models):
  model, flat = models
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 48)), jnp.int32)
  forward = lambda m: jax.jit(lambda t: m(t))(tokens)  # noqa: E731
  want, got = forward(model), forward(flat)
  assert got.mtp_logits is not None
  for name in ("logits", "mtp_logits"):
    err = rel_errors(getattr(got, name), getattr(want, name))
    assert err.max() <= 1e-6, f"{name}: relative error {err.max():.2e}"
  assert float(jnp.max(jnp.abs(got.logits - jnp.roll(want.logits, 1, axis=1)))) > 1e-3  # the check can fail


def prefill_then_decode(model, tokens):
  """[2, S, V] logits: each row's prompt in one prefill, then one decode step per token."""
  prefill, decode = make_prefill(model), make_decode(model)
  cache = model.init_cache(2, 256, kv_format="float32", page_tokens=128)
  out = np.zeros(tokens.shape + (CFG.vocab_size,), np.float32)
  logits, cache = prefill(jnp.asarray(tokens), cache, jnp.asarray(PROMPTS))
  for b, p in enumerate(PROMPTS):
    out[b, :p] = np.asarray(logits[b, :p])
  pos = np.asarray(PROMPTS)
  while np.any(pos < S):
    active = pos < S
    step = tokens[[0, 1], np.minimum(pos, S - 1)][:, None]
    logits, cache = decode(jnp.asarray(step), cache, jnp.asarray(active))
    for b in np.nonzero(active)[0]:
      out[b, pos[b]] = np.asarray(logits[b, 0])
    pos = pos + active
  assert not bool(cache.overflow)
  return out


def test_prefill_and_decode_logits_equal(models):
  model, flat = models
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, S)).astype(np.int32)
  want, got = prefill_then_decode(model, tokens), prefill_then_decode(flat, tokens)
  err = rel_errors(got, want)
  worst = np.unravel_index(np.argmax(err), err.shape)
  assert err.max() <= 1e-6, f"row {worst[0]} position {worst[1]}: relative error {err.max():.2e}"


def test_stacked_checkpoint_loads_unstacked(models, tmp_path, monkeypatch):
  model, flat = models
  save_pretrained(model, CFG, tmp_path, progress=False)
  want = flat_values(flat)
  loaded, _ = load_pretrained(tmp_path, dtype=None, scan_layers=False, progress=False)
  from dsv4_jax import tokenizer
  monkeypatch.setattr(tokenizer.Tokenizer, "load", staticmethod(lambda path: "tokenizer"))
  served, tok = cli._load_for_serving("serve", str(tmp_path), "float32")  # what dsv4 generate / serve load
  assert tok == "tokenizer"
  stacked, _ = cli._load_for_serving("generate", str(tmp_path), "float32", "stacked")  # --layers stacked
  assert stacked.cfg.scan_layers and stacked.plan == model.plan
  for m in (loaded, served):
    assert not m.cfg.scan_layers and m.plan == flat.plan
    got = flat_values(m)
    assert got.keys() == want.keys()
    for path, x in want.items():
      assert got[path].dtype == x.dtype, path
      np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(x), err_msg=str(path))


def test_unstacked_models_pass_through(models, model_factory):
  _, flat = models
  assert unstack_layers(flat) is flat
  tiny = model_factory(ModelConfig.preset("tiny"))  # scanned, but every stack has one repeat: nothing copied
  same = unstack_layers(tiny)
  assert not same.cfg.scan_layers and same.plan == tiny.plan
  before = flat_values(tiny)
  assert all(x is before[p] for p, x in flat_values(same).items())


def test_bad_input(models):
  model, _ = models
  with pytest.raises(TypeError, match="DeepSeekV4"):
    unstack_layers(nnx.state(model))
  graphdef, state = nnx.split(model)
  target = ("stacks", 1, "units", "blocks", 1, "attn_norm", "weight")
  bad = nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(v.get_value()[:1] if p == target else v.get_value()))
                                                 for p, v in nnx.to_flat_state(state)]))  # new variables
  with pytest.raises(ValueError, match=r"stacks/1/units/blocks/1/attn_norm/weight: expected float32 \[2, 64\] "
                                       r"\(stack 1 has 2 repeats\), model has float32 \[1, 64\]"):
    unstack_layers(bad)
  assert model.stacks[1].units.blocks[1].attn_norm.weight.get_value().shape == (2, 64)


def test_serving_a_scanned_model_warns(models, caplog):
  from dsv4_jax.serve.cached_backend import CachedBackend
  model, flat = models
  with caplog.at_level(logging.WARNING, logger="dsv4_jax.serve.backend"):
    CachedBackend(flat, 1, 128)
    assert not caplog.records
    CachedBackend(model, 1, 128)
  assert len(caplog.records) == 1 and "scan_layers=False" in caplog.records[0].getMessage()


SHARDED = """
import json, sys
import jax, numpy as np
from flax import nnx
sys.path.insert(0, {tests!r})
from conftest import random_model
from dsv4_jax import sharding, unstack_layers
from dsv4_jax.config import ModelConfig
cfg = ModelConfig.preset("tiny", num_hidden_layers=5, compress_ratios=(0, 4, 128, 4, 128, 0))
mesh = sharding.make_mesh(fsdp=2, expert=2)
model = random_model(cfg)
graphdef, state = nnx.split(model)
state = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value())), state,
                     sharding.state_shardings(state, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
model = nnx.merge(graphdef, state)
flat = unstack_layers(model)
want = {{p: v.get_value() for p, v in nnx.to_flat_state(sharding.state_shardings(nnx.state(flat), mesh))}}
bad, split = [], 0
for path, v in nnx.to_flat_state(nnx.state(flat)):
  x = v.get_value()
  if not x.sharding.is_equivalent_to(want[path], x.ndim):
    bad.append(f"{{path}}: {{x.sharding}} vs {{want[path]}}")
  split += path[0] == "stacks" and len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated
s, rep, pos = model.layer_location(4)
src = np.asarray(model.stacks[s].units.blocks[pos].ffn.experts.w1.get_value())[rep]
same = bool(np.array_equal(np.asarray(flat.stacks[4].units.blocks[0].ffn.experts.w1.get_value())[0], src))
print(json.dumps({{"devices": jax.device_count(), "bad": bad, "split": int(split), "same": same}}))
"""


def test_slices_keep_their_shardings():
  tests = pathlib.Path(__file__).parent
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", SHARDED.format(tests=str(tests))], capture_output=True, text=True,
                        check=False, env=env, timeout=300, cwd=tests.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["devices"] == 4 and report["same"]
  assert report["bad"] == []
  assert report["split"] > 10  # main-layer parameters really are split over the mesh
