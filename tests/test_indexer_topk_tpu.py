"""Tests for the indexer top-k TPU kernel in TPU interpret mode on the CPU: selection and scores against the
reference over drawn shapes (S not a multiple of the query block, several entry blocks, skipped blocks, top-k
above 128 so whole-slab exchanges run), exact equality including tie order on integer data (exact scores), bf16
and f32, fewer visible entries than k; gradients through implementation="tpu" against dense autodiff.

Poisoning: the interpreter fills every fresh buffer, outputs included, with NaN (tpu.INTERPRET), so a block
the kernel fails to write shows up as NaN scores / garbage indices. A module fixture fails any test in which
the race detector flags a race.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax._src.pallas.mosaic.interpret import interpret_pallas_call

from test_indexer_topk_reference import (check_close, check_selection, grads_dense, grads_op, make_inputs,
                                         make_ranges, numpy_topk, op)


@pytest.fixture(autouse=True)
def no_races():
  yield
  races = interpret_pallas_call.races
  assert races is None or not races.races_found, "the interpreter's race detector flagged a race"


def run_both(q, k, w, start, end, topk):
  args = dict(visible_start=jnp.asarray(start), topk=topk)
  return (op(q, k, w, jnp.asarray(end), implementation="tpu", **args),
          op(q, k, w, jnp.asarray(end), implementation="reference", **args))


@settings(max_examples=4, deadline=None)
@given(S=st.integers(1, 19), H=st.integers(1, 3), N=st.integers(1, 300), topk=st.integers(1, 9),
       pattern=st.sampled_from(["causal", "packed", "random", "none"]), seed=st.integers(0, 2**16))
def test_kernel_equals_reference_exactly_on_ties(S, H, N, topk, pattern, seed):
  """Integer data: every score is exact in float32 whatever the summation order, and ties are frequent, so the
  kernel must reproduce the reference bit for bit, order included."""
  q, k, w = make_inputs(seed, 1, S, H, 8, N, integer=True)
  start, end = make_ranges(seed, 1, S, N, pattern)
  (ti, tv), (ri, rv) = run_both(q, k, w, start, end, topk)
  np.testing.assert_array_equal(np.asarray(ti), np.asarray(ri))
  np.testing.assert_array_equal(np.asarray(tv), np.asarray(rv))
  check_selection(ti, tv, *numpy_topk(np.asarray(q), np.asarray(k), np.asarray(w), start, end, topk), rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_random_scores(dtype):
  """Random data, two batch rows, D not a multiple of 128, entries over 3 blocks: the selection equals the
  brute-force one (no near-ties at this size) and the scores match to float32 rounding."""
  B, S, H, D, N, K = 2, 13, 3, 24, 290, 6
  q, k, w = make_inputs(7, B, S, H, D, N, dtype)
  start, end = make_ranges(7, B, S, N, "random")
  (ti, tv), _ = run_both(q, k, w, start, end, K)
  f32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32))
  check_selection(ti, tv, *numpy_topk(f32(q), f32(k), f32(w), start, end, K), rtol=1e-5)


def test_kernel_topk_above_128():
  """top-200 of up to 300 entries (Kp = 256: two slabs per query, slab-distance exchanges), fewer visible than
  k for the early queries."""
  S, N, K = 9, 300, 200
  q, k, w = make_inputs(8, 1, S, 2, 8, N, integer=True)
  end = np.asarray([[0, 1, 50, 150, 199, 200, 201, 260, 300]], np.int32)
  start = np.zeros_like(end)
  (ti, tv), (ri, rv) = run_both(q, k, w, start, end, K)
  np.testing.assert_array_equal(np.asarray(ti), np.asarray(ri))
  np.testing.assert_array_equal(np.asarray(tv), np.asarray(rv))
  np.testing.assert_array_equal((np.asarray(ti) >= 0).sum(-1), np.minimum(end, K))


def test_kernel_gradients():
  q, k, w = make_inputs(9, 1, 11, 2, 8, 140)
  start, end = (jnp.asarray(a) for a in make_ranges(9, 1, 11, 140, "random"))
  g = jnp.asarray(np.random.default_rng(10).standard_normal((1, 11, 5)), jnp.float32)
  idx, _ = op(q, k, w, end, visible_start=start, topk=5, implementation="tpu")
  for got, want in zip(grads_op(q, k, w, end, start, g, implementation="tpu"), grads_dense(q, k, w, idx, g)):
    check_close(got, want, 1e-5)
