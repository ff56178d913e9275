"""Tests for the compress TPU kernels (TPU interpret mode on the CPU) and the op's custom_vjp: entries of
implementation="tpu" against the reference, and its gradients (the Mosaic backward kernel, tpu_bwd.py) against
the reference's VJP, on drawn shapes (head dims a multiple of 128 or not, the overlap with m = 4 or 8, m = 16 and
m = 128 without, packed documents that break runs of consecutive blocks, empty (-1) slots anywhere), f32 and
bf16; the FP8 cache rows of the kernel byte for byte against dsv4_jax.model.kv_format of its entries.

Tolerances (relative to the largest reference value): entries 1e-5 f32, 2e-2 bf16 (an entry may round to the
neighbouring bf16 value); gradients 1e-4 f32 (float32 sums in another order), 5e-2 bf16.

Poisoning: the interpreter fills fresh buffers, outputs and scratch included, with NaN (INTERPRET), so a slot or
row the kernel fails to write, or a row it reads unfetched, fails the finiteness and value checks. The race
detector watches the DMAs (the next step's rows land while this step computes).
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
from dsv4_jax.model import kv_format
from pallas_kernels.compress import reference, tpu, tpu_bwd


@pytest.fixture(autouse=True, scope="module")
def small_steps():
  """8 slots per forward step whatever m, backward steps of 4 halos: several steps (the cross-step prefetch,
  windows of consecutive blocks and per-slot windows, slots straddling backward blocks) at small S."""
  saved = tpu.ROWS_PER_STEP, tpu_bwd.ROWS_PER_STEP
  tpu.ROWS_PER_STEP = tpu_bwd.ROWS_PER_STEP = 8
  yield
  tpu.ROWS_PER_STEP, tpu_bwd.ROWS_PER_STEP = saved


@pytest.fixture(autouse=True)
def no_races():
  yield
  races = interpret_pallas_call.races
  assert races is None or not races.races_found, "the interpreter's race detector flagged a race"


def make_inputs(seed, B, S, c, rope, ratio, overlap, cuts, dtype, drop=()):
  rng = np.random.default_rng(seed)
  C = 2 * c if overlap else c
  kv = jnp.asarray(rng.standard_normal((B, S, C)), dtype)
  score = jnp.asarray(2 * rng.standard_normal((B, S, C)), dtype)
  ape = jnp.asarray(rng.standard_normal((ratio, C)), jnp.float32)
  weight = jnp.asarray(1 + 0.3 * rng.standard_normal(c), jnp.float32)
  seg = np.zeros((B, S), np.int32)
  for t in cuts:
    seg[0, t:] += 1  # row 0 packed, the other rows one document
  seg = jnp.asarray(seg)
  starts = np.concatenate([[True], np.asarray(seg[0, 1:] != seg[0, :-1])])
  pos = np.arange(S) - np.maximum.accumulate(np.where(starts, np.arange(S), 0))
  positions = jnp.asarray(np.broadcast_to(pos, (B, S)) + 1000 * np.arange(B)[:, None], jnp.int32)
  end, has_prev, pos_N = reference.block_slots(positions, seg, ratio)
  if drop:  # empty slots among the real ones
    end = end.at[:, np.asarray(drop) % end.shape[1]].set(-1)
  slots = (end, has_prev, pos_N)
  freqs = 1.0 / (10000.0 ** (np.arange(0, rope, 2) / rope))
  return (kv, score, ape, weight) + slots, freqs


def _op(implementation, ratio, freqs, out_dtype, output="entries"):
  return functools.partial(pallas_kernels.compress, ratio=ratio, rope_freqs=tuple(freqs), out_dtype=out_dtype,
                           output=output, implementation=implementation)


@functools.partial(jax.jit, static_argnames=("implementation", "ratio", "freqs", "out_dtype"))
def value_and_grads(args, w_out, implementation, ratio, freqs, out_dtype):
  op = _op(implementation, ratio, freqs, out_dtype)
  loss = lambda kv, sc, ape, w: jnp.sum(op(kv, sc, ape, w, *args[4:]).astype(jnp.float32) * w_out)
  return op(*args), jax.grad(loss, argnums=(0, 1, 2, 3))(*args[:4])


def check(got, want, rel):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * max(np.abs(want).max(), 1e-3))


def run_and_compare(seed, B, S, c, rope, ratio, overlap, cuts, dtype, grads=True, drop=()):
  args, freqs = make_inputs(seed, B, S, c, rope, ratio, overlap, [t % S for t in cuts if t % S], dtype, drop)
  freqs = tuple(float(f) for f in np.asarray(freqs, np.float32))
  N = args[4].shape[1]
  w_out = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((B, N, c)), jnp.float32)
  out, g = value_and_grads(args, w_out, "tpu", ratio, freqs, dtype)
  want, want_g = value_and_grads(args, w_out, "reference", ratio, freqs, dtype)
  assert out.dtype == jnp.dtype(dtype)
  rel = 1e-5 if dtype == "float32" else 2e-2  # bf16: an entry may round to the neighbouring bf16 value
  check(out.astype(jnp.float32), want.astype(jnp.float32), rel)
  assert np.all(np.asarray(out)[np.asarray(args[4]) < 0] == 0)
  if grads:
    for a, b in zip(g, want_g):
      check(a.astype(jnp.float32), b.astype(jnp.float32), 1e-4 if dtype == "float32" else 5e-2)
  return args, freqs, out


# (B, S, c, rope, ratio, overlap): c not a multiple of 128 (lane padding), rope tail inside one tile or two;
# m = 4 with the overlap (CSA), m = 16 without (HCA-like at test size), m = 8 with the overlap; S = 136 and 128
# hold windows of 8 consecutive blocks (one DMA), c = 128 with S = 128 runs on the inputs uncopied.
SHAPES = [(2, 40, 40, 8, 4, True), (1, 70, 136, 16, 4, True), (1, 100, 72, 24, 16, False), (2, 60, 64, 16, 8, True),
          (1, 136, 40, 8, 4, True), (1, 128, 128, 16, 4, True)]
# Gradients: CSA (m = 4, 2c channels), m = 128 without the overlap (HCA), m = 16 without.
GRAD_SHAPES = [(2, 136, 40, 8, 4, True), (1, 128, 128, 16, 4, True), (1, 300, 64, 16, 128, False),
               (1, 100, 72, 24, 16, False)]
CUTS = st.lists(st.integers(1, 400), max_size=3, unique=True)  # document starts (mod S)
DROPS = st.lists(st.integers(0, 100), max_size=2)  # slots set to -1 (mod N)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES), dtype=st.sampled_from(["float32", "bfloat16"]),
       cuts=CUTS, drop=DROPS)
def test_matches_reference(seed, shape, dtype, cuts, drop):
  run_and_compare(seed, *shape, cuts=cuts, dtype=dtype, grads=False, drop=drop)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(GRAD_SHAPES),
       dtype=st.sampled_from(["float32", "bfloat16"]), cuts=CUTS, drop=DROPS)
def test_gradients_match_reference_vjp(seed, shape, dtype, cuts, drop):
  """The Mosaic backward's d(kv), d(score), d(ape), d(norm_weight) equal the reference's VJP."""
  run_and_compare(seed, *shape, cuts=cuts, dtype=dtype, drop=drop)


def test_windows_of_consecutive_blocks():
  """One document: most forward steps fetch a single window for their 8 consecutive blocks (32-bit rows: strided
  loads straight from it; bf16: rolled into float32 first), the first step (no rows before block 0) per-slot
  windows; most backward steps see consecutive slots too (strided rows of the frame, cotangents stored in place)."""
  for dtype in ("float32", "bfloat16"):
    run_and_compare(6, 1, 136, 40, 8, 4, True, cuts=[], dtype=dtype)
  run_and_compare(7, 1, 256, 64, 16, 16, False, cuts=[], dtype="float32")


def test_gradients_packed_float32():
  """Kernel forward and backward equal the reference's, with documents breaking the runs."""
  run_and_compare(1, 2, 72, 40, 8, 4, True, cuts=[5, 30, 31], dtype="float32")


def test_gradients_bfloat16_no_overlap():
  run_and_compare(2, 1, 100, 72, 24, 16, False, cuts=[17], dtype="bfloat16", drop=[3])


def test_gradients_hca_float32():
  """m = 128: the backward's row loops are fori_loops (dynamic rows), slots straddle the row blocks."""
  run_and_compare(5, 1, 400, 64, 16, 128, False, cuts=[70], dtype="float32")


def test_fp8_rows_equal_kv_format():
  """The kernel's FP8 cache rows (c = 192: 2 NoPE blocks, 64 rope dims) are the kv_format packing of its own
  entries, byte for byte."""
  args, freqs = make_inputs(3, 2, 64, 192, 64, 4, True, [9, 50], "float32")
  freqs = tuple(float(f) for f in np.asarray(freqs, np.float32))
  entries = jax.jit(lambda a: _op("tpu", 4, freqs, jnp.bfloat16)(*a))(args)
  rows = jax.jit(lambda a: _op("tpu", 4, freqs, jnp.bfloat16, "fp8")(*a))(args)
  assert rows.dtype == jnp.uint8 and rows.shape == entries.shape[:2] + (reference.fp8_row_bytes(192, 64),)
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(kv_format.pack_entries(entries, 64, "fp8")))


def test_dispatch_auto_is_reference_off_tpu():
  args, freqs = make_inputs(4, 1, 8, 64, 16, 4, True, [], "float32")
  auto = _op("auto", 4, freqs, jnp.float32)(*args)
  ref = _op("reference", 4, freqs, jnp.float32)(*args)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
