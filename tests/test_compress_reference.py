"""Tests for pallas_kernels.compress (reference op): the model's unfused compressor (gather, pool, norm, RoPE in
dsv4_jax.model) is the oracle for entries and parameter gradients, on packed documents; `block_slots` against
the model's block layout; `pack_fp8` byte for byte against dsv4_jax.model.kv_format (spec §8.1)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels
from dsv4_jax.config import ModelConfig
from dsv4_jax.model import context, kv_format
from pallas_kernels.compress import reference
from test_compressor import make_compressor  # the same randomized Compressor the model's tests use

CFG = ModelConfig.preset("tiny")  # simulate_quant off: the op's output is the entry


def packed_segments(lengths):
  return np.concatenate([np.full(n, d, np.int32) for d, n in enumerate(lengths)])[None]


@functools.partial(nnx.jit, static_argnames="fused")
def entries(comp, x, segment, fused):
  positions = context.document_positions(segment)
  layout = context.block_layout(positions, segment, comp.ratio)
  fn = comp if fused else comp._unfused
  return fn(x, positions, layout), layout.valid_BN


@pytest.fixture(scope="module", params=[(4, "head"), (4, "index"), (128, "head")], ids=["csa", "indexer", "hca"])
def comp(request):
  ratio, kind = request.param
  return make_compressor(ratio, CFG.head_dim if kind == "head" else CFG.index_head_dim, seed=ratio,
                         for_indexer=kind == "index")


@settings(max_examples=6, deadline=None)
@given(cuts=st.lists(st.integers(1, 299), max_size=4, unique=True), seed=st.integers(0, 1000),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_matches_model_unfused(comp, cuts, seed, dtype):
  """Same entries as the model's gather + pool + norm + RoPE, bit for bit, on the valid slots; zeros elsewhere."""
  seg = jnp.asarray(packed_segments(np.diff([0] + sorted(cuts) + [300])))
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((1, 300, CFG.hidden_size)), dtype)
  got, valid = entries(comp, x, seg, True)
  want, _ = entries(comp, x, seg, False)
  valid = np.asarray(valid)
  assert got.dtype == want.dtype == x.dtype
  got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
  np.testing.assert_array_equal(got[valid], want[valid])
  assert np.all(got[~valid] == 0)


def test_parameter_gradients_match_model_unfused():
  """The op's custom_vjp (the reference's VJP) against autodiff of the model's unfused path, for wkv, wgate,
  ape and the norm weight, across a document boundary."""
  comp = make_compressor(4, CFG.head_dim, seed=3)
  seg = jnp.asarray(packed_segments([13, 27]))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 40, CFG.hidden_size)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(5).standard_normal((1, 10, CFG.head_dim)), jnp.float32)

  def loss(comp, fused):
    out, valid = entries(comp, x, seg, fused)
    return jnp.sum(jnp.where(valid[..., None], out, 0.0) * w)

  got = nnx.grad(functools.partial(loss, fused=True))(comp)
  want = nnx.grad(functools.partial(loss, fused=False))(comp)
  for name in ("wkv", "wgate", "ape"):
    a, b = np.asarray(getattr(got, name)[...]), np.asarray(getattr(want, name)[...])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    assert np.abs(b).max() > 0
  np.testing.assert_allclose(np.asarray(got.norm.weight[...]), np.asarray(want.norm.weight[...]), rtol=1e-5,
                             atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(cuts=st.lists(st.integers(1, 63), max_size=5, unique=True), ratio=st.sampled_from([4, 8, 16]),
       start=st.integers(0, 9))
def test_block_slots_match_model_layout(cuts, ratio, start):
  seg = jnp.asarray(packed_segments(np.diff([0] + sorted(cuts) + [64])))
  positions = context.document_positions(seg) + start * (seg == 0)  # the first document continues a chunk
  layout = context.block_layout(positions, seg, ratio)
  end, has_prev, pos = reference.block_slots(positions, seg, ratio)
  valid = np.asarray(layout.valid_BN)
  np.testing.assert_array_equal(np.asarray(end), np.where(valid, np.asarray(layout.end_BN), -1))
  np.testing.assert_array_equal(np.asarray(has_prev), valid & np.asarray(layout.has_prev_BN))
  np.testing.assert_array_equal(np.asarray(pos)[valid], np.asarray(layout.block_BN)[valid] * ratio)


def _entries_for_packing(rng, shape, dtype):
  x = rng.standard_normal(shape) * np.exp2(rng.integers(-12, 10, shape[:-1] + (1,)))
  x[0, :] = 0.0  # an all-zero entry (the amax floor), and some tiny / huge values
  x[1, :5] = [1e-9, -1e-9, -0.0, 3e-5, -448.0 * 1.001]
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("c,r", [(512, 64), (128, 64), (192, 64)])
def test_pack_fp8_bytes_equal_kv_format(c, r, dtype):
  rng = np.random.default_rng(c + r)
  x = _entries_for_packing(rng, (40, c), dtype)
  got = np.asarray(jax.jit(reference.pack_fp8, static_argnums=1)(x, r))
  want = np.asarray(kv_format.pack_entries(x, r, "fp8"))
  assert got.dtype == np.uint8 and got.shape == (40, reference.fp8_row_bytes(c, r))
  np.testing.assert_array_equal(got, want)
  if c == 512:
    assert got.shape[-1] == 584  # spec §8.1
  back = kv_format.unpack_entries(jnp.asarray(got), c, r, "fp8", jnp.float32)
  assert np.all(np.isfinite(np.asarray(back)))


def _op_args(B=1, S=16, c=128, overlap=True, ratio=4):
  rng = np.random.default_rng(0)
  C = 2 * c if overlap else c
  kv, score = (jnp.asarray(rng.standard_normal((B, S, C)), jnp.float32) for _ in range(2))
  ape = jnp.zeros((ratio, C), jnp.float32)
  seg = jnp.zeros((B, S), jnp.int32)
  end, has_prev, pos = reference.block_slots(context.document_positions(seg), seg, ratio)
  return kv, score, ape, jnp.ones((c,), jnp.float32), end, has_prev, pos


def test_fp8_output_of_the_op():
  args = _op_args()
  kw = dict(ratio=4, rope_freqs=np.ones(32, np.float32))
  rows = pallas_kernels.compress(*args, output="fp8", implementation="reference", **kw)
  out = pallas_kernels.compress(*args, implementation="reference", **kw)
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(kv_format.pack_entries(out, 64, "fp8")))


def test_bad_inputs_are_named():
  kv, score, ape, w, end, has_prev, pos = _op_args()
  kw = dict(ratio=4, rope_freqs=np.ones(32, np.float32))
  op = pallas_kernels.compress
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      op(kv, score, ape, w, end, has_prev, pos, implementation="gpu", **kw)
  with pytest.raises(ValueError, match="implementation"):
    op(kv, score, ape, w, end, has_prev, pos, implementation="cuda", **kw)
  with pytest.raises(ValueError, match="output"):
    op(kv, score, ape, w, end, has_prev, pos, output="fp4", **kw)
  with pytest.raises(ValueError, match="kv's channels"):
    op(kv[..., :100], score[..., :100], ape, w, end, has_prev, pos, **kw)
  with pytest.raises(ValueError, match="ape must be"):
    op(kv, score, ape[:2], w, end, has_prev, pos, **kw)
  with pytest.raises(ValueError, match="has_prev"):
    op(kv, score, ape, w, end, has_prev[:, :2], pos, **kw)
  with pytest.raises(ValueError, match="rope dims"):
    op(kv, score, ape, w, end, has_prev, pos, ratio=4, rope_freqs=np.ones(65, np.float32))
  with pytest.raises(ValueError, match="NoPE"):
    op(kv[..., :192], score[..., :192], ape[:, :192], w[:96], end, has_prev, pos, output="fp8", **kw)
