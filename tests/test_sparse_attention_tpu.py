"""Tests for the sparse-attention TPU kernels (run in TPU interpret mode on the CPU) and the shared custom_vjp:
outputs and gradients of implementation="tpu" and of the reference backward against jax.grad of the reference
forward, over drawn shapes (S not a multiple of the query block, D not a multiple of 128, several index chunks)
and index patterns.

Poisoning: the interpreter fills every fresh buffer, outputs included, with NaN (tpu.INTERPRET), and the
backward starts dq as NaN, so a block a kernel fails to write fails the finiteness and value checks. The race
detector watches the DMAs; a module fixture fails any test that it flags.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax._src.pallas.mosaic.interpret import interpret_pallas_call

import pallas_kernels
from pallas_kernels.sparse_attention import tpu, vjp
from pallas_kernels.sparse_attention.reference import sparse_attention_reference
from test_sparse_attention_reference import inputs, make_indices

SCALE = 0.3


@pytest.fixture(autouse=True, scope="module")
def small_blocks():
  """8 index columns per grid step (so small K spans several steps: the online softmax and dq accumulate across
  them) and one query block per backward chunk (the chunk loop and the in-place dq run)."""
  saved = tpu.BLOCK_K, tpu.DKV_CHUNK_BYTES
  tpu.BLOCK_K, tpu.DKV_CHUNK_BYTES = 8, 1
  yield
  tpu.BLOCK_K, tpu.DKV_CHUNK_BYTES = saved


@pytest.fixture(autouse=True)
def no_races():
  yield
  races = interpret_pallas_call.races
  assert races is None or not races.races_found, "the interpreter's race detector flagged a race"


def _loss(fn, q, kv, sink, idx, w_out, w_lse):
  out, lse = fn(q, kv, sink, idx)
  return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse)


def _op(implementation):
  return functools.partial(pallas_kernels.sparse_attention, scale=SCALE, implementation=implementation)


ORACLE = functools.partial(sparse_attention_reference, scale=SCALE)  # differentiated by jax.grad
FNS = {"tpu": _op("tpu"), "reference": _op("reference"), "oracle": ORACLE}


@functools.partial(jax.jit, static_argnames="name")
def value_and_grads(name, q, kv, sink, idx, w_out, w_lse):
  fn = FNS[name]
  grads = jax.grad(_loss, argnums=(1, 2, 3))(fn, q, kv, sink, idx, w_out, w_lse)
  return fn(q, kv, sink, idx), grads


def _weights(seed, q):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
          jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32))


def check(got, want, rel):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert np.all(np.isfinite(got))
  err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-6)
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * max(np.abs(want).max(), 1e-3))
  assert err < rel, err


def run_and_compare(q, kv, sink, idx, seed, implementations=("tpu", "reference")):
  dtype = q.dtype
  w_out, w_lse = _weights(seed, q)
  # The oracle sees the same (rounded) values in float32.
  f32 = [x.astype(jnp.float32) for x in (q, kv)]
  (want_out, want_lse), want_g = value_and_grads("oracle", f32[0], f32[1], sink, idx, w_out, w_lse)
  rel = 2e-5 if dtype == jnp.float32 else 3e-2
  for name in implementations:
    (out, lse), g = value_and_grads(name, q, kv, sink, idx, w_out, w_lse)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert g[0].dtype == dtype and g[1].dtype == dtype and g[2].dtype == jnp.float32
    check(out, want_out, rel)
    check(lse, want_lse, rel)
    for a, b in zip(g, want_g):
      check(a, b, 2 * rel)


# B, S, H, D, T, K: S never a multiple of 8 (query padding), D never of 128 (lane padding); K > 8 spans several
# index chunks; the window pattern uses T = S and a window of K (runs of 8 once t >= 7: the one-DMA path).
SHAPES = [(1, 5, 2, 8, 9, 4), (2, 11, 3, 40, 13, 12), (1, 19, 2, 24, 30, 16)]
PATTERNS = ["random", "window", "shared", "all_masked"]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES), pattern=st.sampled_from(PATTERNS),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_matches_reference(seed, shape, pattern, dtype):
  B, S, H, D, T, K = shape
  if pattern == "window":
    T = S
  q, kv, sink, idx = inputs(seed, B, S, H, D, T, K, pattern)
  run_and_compare(q.astype(dtype), kv.astype(dtype), sink, idx, seed)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_float32(pattern):
  """Every pattern at least once, whatever hypothesis draws."""
  B, S, H, D, T, K = SHAPES[2]
  q, kv, sink, idx = inputs(11, B, S, H, D, S if pattern == "window" else T, K, pattern)
  run_and_compare(q, kv, sink, idx, 11)


def test_prefix_runs_and_repeats():
  """HCA-like prefixes (query t sees entries 0..t: one contiguous run per full chunk) next to a chunk of random
  picks that repeat across queries."""
  B, S, H, D, T, K = 1, 21, 2, 16, 24, 24
  q, kv, sink, _ = inputs(3, B, S, H, D, T, K, "random")
  j, t = np.arange(16)[None], np.arange(S)[:, None]
  prefix = np.where(j <= t, j, -1)
  picks = np.random.default_rng(4).choice(np.arange(16, T), size=(S, 8), replace=True)
  picks = np.where(np.arange(8) == 0, picks, -1)  # one pick per query; many queries share it
  idx = jnp.asarray(np.concatenate([prefix, picks], axis=1)[None].astype(np.int32))
  run_and_compare(q, kv, sink, idx, 5)


def test_backward_chunks_overlap():
  """Five query blocks in chunks of two: the last chunk restarts at block 3 and must not add block 3 twice."""
  B, S, H, D, T, K = 1, 37, 2, 16, 20, 8
  q, kv, _, idx = inputs(6, B, S, H, D, T, K, "random")
  rng = np.random.default_rng(7)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  lse = jnp.asarray(rng.standard_normal(q.shape[:3]) + 2, jnp.float32)
  delta = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
  block_bytes = B * tpu.BLOCK_Q * 8 * 128 * 4  # one query block's dkv contributions (KC = Kp = 8, Dp = 128)
  got = jax.jit(functools.partial(tpu.sparse_attention_tpu_bwd, scale=SCALE, dkv_chunk_bytes=2 * block_bytes))(
      q, kv, idx, dout, lse, delta)
  want = vjp.reference_bwd(q, kv, idx, dout, lse, delta, scale=SCALE, query_chunk=8)
  for a, b in zip(got, want):
    check(a, b, 2e-5)


def test_reference_bwd_chunking():
  B, S, H, D, T, K = 2, 13, 2, 8, 10, 5
  q, kv, _, idx = inputs(8, B, S, H, D, T, K, "random")
  rng = np.random.default_rng(9)
  dout, lse, delta = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (q.shape, q.shape[:3],
                                                                                 q.shape[:3]))
  for a, b in zip(vjp.reference_bwd(q, kv, idx, dout, lse, delta, scale=SCALE, query_chunk=4),
                  vjp.reference_bwd(q, kv, idx, dout, lse, delta, scale=SCALE)):
    check(a, b, 1e-6)


def test_no_gradient_to_indices_and_dispatch():
  q, kv, sink, idx = inputs(10, 1, 3, 2, 8, 4, 2, "random")
  (out, lse), pullback = jax.vjp(_op("reference"), q, kv, sink, idx)
  cts = pullback((jnp.ones_like(out), jnp.ones_like(lse)))
  assert cts[3].dtype == jax.dtypes.float0
  auto = _op("auto")(q, kv, sink, idx)  # the reference off TPU
  for a, b in zip(auto, (out, lse)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):  # the Mosaic GPU kernel: tests/test_sparse_attention_gpu.py
    _op("gpu")(q, kv, sink, idx)
  with pytest.raises(ValueError, match="512"):
    _op("reference")(jnp.zeros((1, 1, 1, 520)), jnp.zeros((1, 1, 520)), sink[:1], idx[:, :1])


def test_make_indices_patterns_have_runs():
  """The window pattern in SHAPES[2] reaches the one-DMA path (a fully valid, consecutive chunk of 8)."""
  S, K = SHAPES[2][1], SHAPES[2][5]
  idx = make_indices(np.random.default_rng(0), "window", 1, S, S, K)[0]
  chunks = idx[:, :8]
  assert any(np.all(c >= 0) and np.all(np.diff(c) == 1) for c in chunks)
