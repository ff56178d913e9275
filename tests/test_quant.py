"""Tests for dsv4_jax.model.quant: QAT rounding bit-exact against numpy + ml_dtypes, checkpoint formats by hand."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4_jax.model import quant

E4M3 = ml_dtypes.float8_e4m3fn
E2M1 = ml_dtypes.float4_e2m1fn
BF16 = ml_dtypes.bfloat16
DTYPES = {"float32": np.float32, "bfloat16": BF16}


def _grid(dtype) -> np.ndarray:
  """All finite non-negative values of a small float type, ascending."""
  values = np.arange(256 if dtype == E4M3 else 16, dtype=np.uint8).view(dtype).astype(np.float32)
  return np.unique(values[np.isfinite(values) & (values >= 0)])


@dataclasses.dataclass(frozen=True)
class Fmt:
  name: str
  max_value: float
  floor: float
  dtype: type
  qdq: object  # jitted quant.fp*_qdq(x, block)

  @property
  def grid(self):
    return _grid(self.dtype)


FP8 = Fmt("fp8", 448.0, 1e-4, E4M3, jax.jit(quant.fp8_e4m3_qdq, static_argnums=1))
FP4 = Fmt("fp4", 6.0, 6.0 * 2.0**-126, E2M1, jax.jit(quant.fp4_e2m1_qdq, static_argnums=1))
hadamard = jax.jit(quant.hadamard)


def _bits(a) -> np.ndarray:
  a = np.asarray(a)
  return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _assert_bits_equal(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape
  bad = _bits(got) != _bits(want)
  assert not bad.any(), f"{bad.sum()} mismatches, first: got {got[bad][:5]} want {want[bad][:5]}"


# ---------------------------------------------------------------------------------------------------------------
# Independent references.


def _ref_scale(amax, max_value: float) -> np.ndarray:
  """Exact smallest power of two 2**k with amax <= max_value * 2**k (float64 comparisons are exact here)."""
  a = np.asarray(amax, np.float64)
  k = np.ceil(np.log2(a / max_value))
  k = np.where(a > max_value * np.exp2(k), k + 1, k)
  k = np.where(a <= max_value * np.exp2(k - 1), k - 1, k)
  return np.exp2(k).astype(np.float32)


def _ref_qdq(x, block: int, fmt: Fmt) -> np.ndarray:
  """numpy quantize-dequantize with the ml_dtypes cast doing the rounding."""
  x = np.asarray(x)
  x_NB = x.astype(np.float32).reshape(*x.shape[:-1], -1, block)
  amax = np.maximum(np.abs(x_NB).max(axis=-1, keepdims=True), np.float32(fmt.floor))
  scale = _ref_scale(amax, fmt.max_value)
  q = np.clip(x_NB / scale, -fmt.max_value, fmt.max_value).astype(fmt.dtype).astype(np.float32)
  return (q * scale).reshape(x.shape).astype(x.dtype)


def _rne_by_search(v, dtype) -> np.ndarray:
  """Round |v| <= max onto the grid of `dtype` by nearest search, ties to the even code; sign kept."""
  grid = _grid(dtype)
  codes = grid.astype(dtype).view(np.uint8)
  a = np.abs(np.asarray(v, np.float32))
  hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
  lo = hi - 1
  d_lo, d_hi = a - grid[lo], grid[hi] - a
  pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
  return np.copysign(np.where(pick_hi, grid[hi], grid[lo]), v).astype(np.float32)


def _next_up(v, dtype):
  """The next representable value above positive v in `dtype`."""
  a = np.asarray(v, dtype)
  u = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
  return (a.view(u) + u(1)).view(dtype)


def _next_down(v, dtype):
  a = np.asarray(v, dtype)
  u = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
  return (a.view(u) - u(1)).view(dtype)


def test_ml_dtypes_casts_round_nearest_even():
  """The reference leans on ml_dtypes casts: check them against a nearest search on every tie and random values."""
  rng = np.random.default_rng(0)
  for dtype, max_value in ((E4M3, 448.0), (E2M1, 6.0)):
    grid = _grid(dtype)
    mids = (grid[:-1] + grid[1:]) / 2
    v = np.concatenate([grid, mids, -grid, -mids, rng.uniform(-max_value, max_value, 20000)]).astype(np.float32)
    _assert_bits_equal(v.astype(dtype).astype(np.float32), _rne_by_search(v, dtype))


@pytest.mark.parametrize("fmt, mantissa_bits, min_exponent", [(FP8, 3, -6), (FP4, 1, 0)], ids=["fp8", "fp4"])
def test_round_to_grid_equals_the_cast(fmt, mantissa_bits, min_exponent):
  """The arithmetic RNE used inside jit == the ml_dtypes cast, on every grid point, every tie and random values."""
  rng = np.random.default_rng(10)
  grid = fmt.grid
  mids = (grid[:-1] + grid[1:]) / 2
  m = fmt.max_value
  v = np.concatenate([grid, mids, -grid, -mids, [-0.0], rng.uniform(-m, m, 50000),
                      rng.uniform(-1, 1, 20000) * grid[1] * 2]).astype(np.float32)
  fn = jax.jit(quant._round_to_grid, static_argnums=(1, 2))
  _assert_bits_equal(fn(jnp.asarray(v), mantissa_bits, min_exponent), v.astype(fmt.dtype).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Scale: 2**ceil(log2(amax / max)) from the exponent bits.


@pytest.mark.parametrize("max_value", [448.0, 6.0])
def test_scale_exact_on_every_mantissa_of_the_edge_binade(max_value):
  """amax * f32(1/max) (the kernel's product) gives the exact ceil-log2 for all 2**23 mantissas around max."""
  e = int(np.floor(np.log2(max_value)))
  amax = ((np.arange(2**23, dtype=np.uint32) | np.uint32(127 + e) << 23)).view(np.float32)
  want = _ref_scale(amax, max_value)
  _assert_bits_equal(quant._pow2_scale_np(amax, max_value), want)
  _assert_bits_equal(jax.jit(quant._pow2_scale, static_argnums=1)(jnp.asarray(amax), max_value), want)


@pytest.mark.parametrize("max_value, floor", [(448.0, 1e-4), (6.0, 6.0 * 2.0**-126)])
def test_scale_exact_over_the_float32_range(max_value, floor):
  rng = np.random.default_rng(1)
  amax = rng.integers(1 << 23, 0x7F000000, 200000, dtype=np.uint32).view(np.float32)
  amax = np.maximum(amax, np.float32(floor))
  want = _ref_scale(amax, max_value)
  _assert_bits_equal(quant._pow2_scale_np(amax, max_value), want)
  _assert_bits_equal(jax.jit(quant._pow2_scale, static_argnums=1)(jnp.asarray(amax), max_value), want)


@pytest.mark.parametrize("fmt", [FP8, FP4], ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_amax_at_a_power_of_two_times_max(fmt, dtype):
  """amax == max * 2**k -> scale 2**k (the block max lands on +-max); one ulp above -> 2**(k+1)."""
  dtype = DTYPES[dtype]
  block = 32
  for k in range(-20, 21):
    edge = np.float32(fmt.max_value * 2.0**k)
    for amax, scale in ((edge, 2.0**k), (_next_up(edge, dtype), 2.0 ** (k + 1)),
                        (_next_down(edge, dtype), 2.0**k)):
      x = np.zeros((2, block), dtype)
      x[0, 3], x[1, 7] = amax, -np.asarray(amax, dtype)
      x[:, 0] = np.asarray(scale * 0.75 * fmt.grid[1], dtype)  # a tie between 0 and the first grid step
      out = np.asarray(fmt.qdq(jnp.asarray(x), block))
      _assert_bits_equal(out, _ref_qdq(x, block, fmt))
      q = out.astype(np.float32) / np.float32(scale)
      assert q[0, 3] == -q[1, 7] == _rne_by_search(np.float32(amax) / np.float32(scale), fmt.dtype)
      assert abs(q[0, 3]) <= fmt.max_value


# ---------------------------------------------------------------------------------------------------------------
# Hand-checked rounding.


def test_fp8_hand_ties_and_floor():
  block = 16
  x = np.zeros((3, block), np.float32)
  # Row 0: amax 448 -> scale 1.
  x[0, :10] = [448, 17, 19, 432, -17, 0.5 * 2**-9, 1.5 * 2**-9, -0.0, 2.5 * 2**-9, 1.0625]
  want0 = [448, 16, 20, 448, -16, 0, 2**-8, -0.0, 2**-8, 1.0]
  # Row 1: amax 449 -> scale 2: 449 / 2 = 224.5 -> 224; 3 / 2 = 1.5 exactly.
  x[1, :3] = [449, 3, -1]
  want1 = [448, 3, -1]
  # Row 2: amax 1e-5 < 1e-4 -> scale 2**-22; 1e-5 / 2**-22 = 41.94 -> 40 (grid step 4 in [32, 64)).
  x[2, :2] = [1e-5, -1e-5]
  want2 = [40 * 2**-22, -40 * 2**-22]
  out = np.asarray(FP8.qdq(jnp.asarray(x), block))
  np.testing.assert_array_equal(out[0, :10], np.float32(want0))
  assert np.signbit(out[0, 7]) and not np.signbit(out[0, 5])
  np.testing.assert_array_equal(out[1, :3], np.float32(want1))
  np.testing.assert_array_equal(out[2, :2], np.float32(want2))
  _assert_bits_equal(out, _ref_qdq(x, block, FP8))


def test_fp4_hand_ties_and_floor():
  block = 16
  x = np.zeros((2, block), np.float32)
  x[0, :16] = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -5, -0.25, 5.5, 0.2, 2.25, 4.9, -6, -0.0]
  want0 = [6, 0, 1, 1, 2, 2, 4, 4, -4, -0.0, 6, 0, 2, 4, -6, -0.0]
  # amax 5 * 2**-126 < floor 6 * 2**-126 -> scale 2**-126 and 5 -> 4 (tie to even).
  x[1, :2] = [5 * 2.0**-126, -3 * 2.0**-126]
  want1 = [4 * 2.0**-126, -3 * 2.0**-126]
  out = np.asarray(FP4.qdq(jnp.asarray(x), block))
  _assert_bits_equal(out[0], np.float32(want0))
  np.testing.assert_array_equal(out[1, :2], np.float32(want1))
  _assert_bits_equal(out, _ref_qdq(x, block, FP4))


# ---------------------------------------------------------------------------------------------------------------
# Drawn blocks: bit-exact against the reference, on the grid, idempotent.

KINDS = ("normal", "uniform", "grid", "ties", "top", "zeros", "tiny", "edge")


def _make_blocks(seed, kinds, exps, fmt: Fmt, block: int, dtype, shape=(2, 2, 3)):
  """x of shape (*shape[:-1], shape[-1] * block): each block of one kind at scale 2**k (hypothesis picks both)."""
  rng = np.random.default_rng(seed)
  grid = fmt.grid
  mids = (grid[:-1] + grid[1:]) / 2
  top = np.concatenate([grid[grid >= fmt.max_value / 2], mids[mids >= fmt.max_value / 2]])
  m = fmt.max_value
  blocks = []
  for i in range(int(np.prod(shape))):
    kind, s = kinds[i % len(kinds)], 2.0 ** exps[i % len(exps)]
    sign = rng.choice([-1.0, 1.0], block)
    pin = True  # put +-max * s in the block so the scale is exactly s
    if kind == "normal":
      v, pin = rng.standard_normal(block) * m * s / 4, False
    elif kind == "uniform":
      v, pin = rng.uniform(-m, m, block) * s, False
    elif kind == "grid":
      v = rng.choice(grid, block) * sign * s
    elif kind == "ties":
      v = rng.choice(mids, block) * sign * s
    elif kind == "top":
      v = rng.choice(top, block) * sign * s
    elif kind == "zeros":
      v, pin = np.where(sign < 0, -0.0, 0.0), False
    elif kind == "tiny":  # below the amax floor (kept normal in float32: XLA:CPU flushes subnormals)
      lo = 2.0**-126 if fmt is FP4 else 1e-9
      v, pin = sign * rng.uniform(lo, fmt.floor, block), False
      v[rng.random(block) < 0.2] = 0.0
    else:  # "edge": amax one ulp above / at / below max * s
      v, pin = rng.standard_normal(block) * m * s / 3, False
      edge = np.asarray(m * s, dtype)
      v = np.clip(v, -m * s, m * s)
      v[rng.integers(block)] = [_next_up(edge, dtype), edge, _next_down(edge, dtype)][rng.integers(3)]
    if pin:
      v[rng.integers(block)] = rng.choice([-1.0, 1.0]) * m * s
    blocks.append(v)
  x = np.stack(blocks).astype(np.float32).astype(dtype)
  return x.reshape(*shape[:-1], shape[-1] * block)


def _drawn(fmt: Fmt, blocks: tuple[int, ...]):
  return st.tuples(
    st.integers(0, 2**32 - 1),
    st.lists(st.sampled_from(KINDS), min_size=1, max_size=12),
    st.lists(st.integers(-20, 20), min_size=1, max_size=12),
    st.sampled_from(blocks),
    st.sampled_from(sorted(DTYPES)),
  ).map(lambda a: (fmt, a[3], _make_blocks(a[0], a[1], a[2], fmt, a[3], DTYPES[a[4]])))


_cases = st.one_of(_drawn(FP8, (64, 128)), _drawn(FP4, (32,)))


@settings(max_examples=120, deadline=None)
@given(_cases)
def test_qdq_bit_exact_on_grid_and_idempotent(case):
  fmt, block, x = case
  out = np.asarray(fmt.qdq(jnp.asarray(x), block))
  _assert_bits_equal(out, _ref_qdq(x, block, fmt))
  # On the grid: out / scale is a grid value, with the reference's scale of the input block.
  x_NB = x.astype(np.float32).reshape(*x.shape[:-1], -1, block)
  scale = _ref_scale(np.maximum(np.abs(x_NB).max(-1, keepdims=True), np.float32(fmt.floor)), fmt.max_value)
  q = out.astype(np.float32).reshape(x_NB.shape) / scale
  assert np.all(np.abs(q) <= fmt.max_value)
  _assert_bits_equal(q.astype(fmt.dtype).astype(np.float32), q)
  # Idempotent.
  _assert_bits_equal(np.asarray(fmt.qdq(jnp.asarray(out), block)), out)


def test_qdq_any_leading_shape_and_bad_block():
  x = np.random.default_rng(2).standard_normal((2, 3, 4, 128)).astype(np.float32)
  out = np.asarray(FP8.qdq(jnp.asarray(x), 64))
  _assert_bits_equal(out, _ref_qdq(x, 64, FP8))
  _assert_bits_equal(out.reshape(-1, 128), np.asarray(FP8.qdq(jnp.asarray(x.reshape(-1, 128)), 64)))
  with pytest.raises(ValueError):
    quant.fp4_e2m1_qdq(jnp.ones((4, 48)), 32)


# ---------------------------------------------------------------------------------------------------------------
# Straight-through gradient.


@pytest.mark.parametrize("fn, block", [(quant.fp8_e4m3_qdq, 64), (quant.fp4_e2m1_qdq, 32)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_straight_through_gradient(fn, block, dtype):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, 2 * block)) * 10, dtype)
  w = jnp.asarray(rng.standard_normal((3, 2 * block)), dtype)
  grad = jax.jit(jax.grad(lambda v: jnp.sum((fn(v, block) * w).astype(jnp.float32))))(x)
  assert grad.dtype == dtype
  _assert_bits_equal(grad, w)
  _, tangent = jax.jvp(lambda v: fn(v, block), (x,), (w,))
  _assert_bits_equal(tangent, w)
  ones = jax.grad(lambda v: jnp.sum(fn(v, block).astype(jnp.float32)))(x)
  assert np.all(np.asarray(ones, np.float32) == 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Hadamard.


def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


@pytest.mark.parametrize("n", [1, 2, 4, 32, 64, 128])
def test_hadamard_matches_sylvester_and_is_orthogonal(n):
  # Rows: the n unit vectors (they give the matrix rows exactly: +-f32(n**-0.5) in Sylvester order), then noise.
  x = np.concatenate([np.eye(n), np.random.default_rng(n).standard_normal((6, n))]).astype(np.float32)
  y = np.asarray(hadamard(jnp.asarray(x)))
  _assert_bits_equal(y[:n], (np.float32(n**-0.5) * _sylvester(n)).astype(np.float32))
  np.testing.assert_allclose(y, x.astype(np.float64) @ _sylvester(n) * n**-0.5, rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.asarray(hadamard(jnp.asarray(y))), x, rtol=0, atol=2e-6)


def test_hadamard_leading_dims():
  x = np.random.default_rng(4).standard_normal((2, 3, 32)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(hadamard(jnp.asarray(x))), x @ _sylvester(32) * 32**-0.5, rtol=0, atol=2e-6)


def test_hadamard_bf16_rounds_once_and_rejects_bad_length():
  x = np.random.default_rng(5).standard_normal((4, 128)).astype(BF16)
  y = np.asarray(hadamard(jnp.asarray(x)))
  assert y.dtype == BF16
  want = (x.astype(np.float64) @ _sylvester(128) * 128**-0.5)
  ulp = np.abs(y.astype(np.float64) - want) / np.abs(want).clip(1e-3) * 2**7
  assert ulp.max() <= 1.0  # one rounding of the float32 result
  with pytest.raises(ValueError):
    quant.hadamard(jnp.ones((2, 48)))


# ---------------------------------------------------------------------------------------------------------------
# ue8m0 scales.


def test_ue8m0_conversions():
  b = np.arange(255, dtype=np.uint8)
  want = np.array([2.0 ** (int(i) - 127) for i in b], np.float64).astype(np.float32)
  assert want[0] == 2.0**-127 and want[127] == 1.0 and want[130] == 8.0
  _assert_bits_equal(quant.ue8m0_to_float32(b), want)
  _assert_bits_equal(quant.ue8m0_to_float32(b.view(ml_dtypes.float8_e8m0fnu)), want)
  _assert_bits_equal(quant.ue8m0_to_float32(b.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)), want)
  _assert_bits_equal(quant.ue8m0_to_float32(want.reshape(15, 17)), want.reshape(15, 17))
  np.testing.assert_array_equal(quant.float32_to_ue8m0(want), b)
  assert quant.float32_to_ue8m0(want).dtype == np.uint8
  for bad in ([3.0], [0.0], [-2.0], [np.inf], [np.nan], [2.0**-128], [2.0**128]):
    with pytest.raises(ValueError):
      quant.float32_to_ue8m0(np.array(bad, np.float64))
  with pytest.raises(ValueError):
    quant.ue8m0_to_float32(np.array([255], np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# FP8 weight blocks.


def test_fp8_dequant_hand_made():
  # e4m3fn bytes: 0x38 = 1.0, 0x40 = 2.0, 0x7E = 448, 0xFE = -448, 0x01 = 2**-9, 0x80 = -0.0, 0xB8 = -1.0.
  w = np.array([[0x38, 0x40, 0x7E, 0xFE], [0x01, 0x80, 0xB8, 0x00]], np.uint8)
  scale = np.array([[127 + 3]], np.uint8)  # 8.0
  want = np.float32([[8, 16, 3584, -3584], [2.0**-6, -0.0, -8, 0]])
  for weight in (w, w.view(np.int8), w.view(E4M3)):
    for s in (scale, scale.view(ml_dtypes.float8_e8m0fnu), np.float32([[8.0]])):
      _assert_bits_equal(quant.dequant_fp8_blocks(weight, s), want)


def test_fp8_dequant_partial_blocks():
  w = np.full((130, 200), 0x38, np.uint8).view(E4M3)  # all 1.0
  scale = np.array([[127 + 3, 127 - 1], [127, 127 + 10]], np.uint8)
  out = quant.dequant_fp8_blocks(w, scale)
  assert out.shape == (130, 200) and out.dtype == np.float32
  assert np.all(out[:128, :128] == 8.0) and np.all(out[:128, 128:] == 0.5)
  assert np.all(out[128:, :128] == 1.0) and np.all(out[128:, 128:] == 1024.0)
  with pytest.raises(ValueError):
    quant.dequant_fp8_blocks(w, scale[:1])


def test_fp8_round_trip_exact_on_grid_partial_blocks():
  """Tiles holding +-448 * 2**k and grid multiples of 2**k come back exactly, with scale byte 127 + k."""
  rng = np.random.default_rng(6)
  rows, cols = 130, 200
  k_oi = rng.integers(-10, 10, (2, 2))
  k_OI = np.repeat(np.repeat(k_oi, 128, 0), 128, 1)[:rows, :cols]
  w = rng.choice(np.concatenate([FP8.grid, -FP8.grid]), (rows, cols)) * 2.0**k_OI
  for i in range(2):
    for j in range(2):
      w[128 * i, 128 * j] = -448.0 * 2.0 ** k_oi[i, j]
  w = w.astype(np.float32)
  q, s = quant.quant_fp8_blocks(w)
  assert q.dtype == E4M3 and q.shape == (rows, cols)
  assert s.dtype == ml_dtypes.float8_e8m0fnu and s.shape == (2, 2)
  np.testing.assert_array_equal(s.view(np.uint8), (127 + k_oi).astype(np.uint8))
  _assert_bits_equal(quant.dequant_fp8_blocks(q, s), w)


def test_fp8_quant_random_matches_per_tile_reference():
  rng = np.random.default_rng(7)
  w = (rng.standard_normal((2, 130, 200)) * np.exp(rng.uniform(-8, 8, (2, 130, 1)))).astype(np.float32)
  w[0, :128, 128:] = 0.0  # an all-zero tile (amax floor)
  q, s = quant.quant_fp8_blocks(w)
  assert s.shape == (2, 2, 2)
  got = quant.dequant_fp8_blocks(q, s)
  for e in range(2):
    for i0, i1 in ((0, 128), (128, 130)):
      for j0, j1 in ((0, 128), (128, 200)):
        tile = w[e, i0:i1, j0:j1]
        _assert_bits_equal(got[e, i0:i1, j0:j1], _ref_qdq(tile.reshape(1, -1), tile.size, FP8).reshape(tile.shape))
  # A single row: 1x128 tiles are exactly the activation quantizer's 128-blocks.
  row = w[1, :1, :128]
  _assert_bits_equal(quant.dequant_fp8_blocks(*quant.quant_fp8_blocks(row)), np.asarray(FP8.qdq(jnp.asarray(row), 128)))


# ---------------------------------------------------------------------------------------------------------------
# FP4 packed experts.


def test_fp4_lut_matches_e2m1():
  codes = np.arange(16, dtype=np.uint8)
  _assert_bits_equal(quant.FP4_E2M1_VALUES, codes.view(E2M1).astype(np.float32))


def test_fp4_dequant_hand_made():
  packed = np.zeros((2, 16), np.uint8)
  packed[0, :4] = [0x7F, 0x21, 0xF7, 0x98]  # (-6, 6), (0.5, 1), (6, -6), (-0, -0.5)
  packed[1, 0] = 0x5A  # low 0xA = -1.0 (col 0), high 0x5 = 3.0 (col 1)
  scale = np.array([[127 + 2], [127 - 1]], np.uint8)  # 4.0, 0.5
  want = np.zeros((2, 32), np.float32)
  want[0, :8] = np.float32([-6, 6, 0.5, 1, 6, -6, -0.0, -0.5]) * 4
  want[1, :2] = np.float32([-1, 3]) * 0.5
  for p in (packed, packed.view(np.int8)):
    for s in (scale, scale.view(ml_dtypes.float8_e8m0fnu), np.float32([[4.0], [0.5]])):
      _assert_bits_equal(quant.dequant_fp4_packed(p, s), want)
  assert packed.view(np.int8)[0, 2] == -9  # 0xF7 as int8, the checkpoint's dtype


def test_fp4_round_trip_exact_on_grid():
  rng = np.random.default_rng(8)
  k_OK = rng.integers(-20, 20, (3, 4))
  w = rng.choice(np.concatenate([FP4.grid, -FP4.grid]), (3, 4, 32)) * 2.0 ** k_OK[..., None]
  w[:, :, 5] = 6.0 * 2.0**k_OK
  w = w.reshape(3, 128).astype(np.float32)
  packed, s = quant.quant_fp4_packed(w)
  assert packed.dtype == np.int8 and packed.shape == (3, 64)
  assert s.dtype == ml_dtypes.float8_e8m0fnu and s.shape == (3, 4)
  np.testing.assert_array_equal(s.view(np.uint8), (127 + k_OK).astype(np.uint8))
  _assert_bits_equal(quant.dequant_fp4_packed(packed, s), w)
  # Nibble order: column 2c in the low nibble, 2c + 1 in the high one.
  u = packed.view(np.uint8)
  q = (w.reshape(3, 4, 32) / quant.ue8m0_to_float32(s)[..., None]).reshape(3, 128).astype(E2M1).view(np.uint8)
  np.testing.assert_array_equal(u & 0x0F, q[:, 0::2])
  np.testing.assert_array_equal(u >> 4, q[:, 1::2])


def test_fp4_quant_matches_qat_simulation():
  rng = np.random.default_rng(9)
  w = (rng.standard_normal((2, 5, 256)) * np.exp(rng.uniform(-10, 10, (2, 5, 1)))).astype(np.float32)
  w[0, 0, :32] = 0.0
  got = quant.dequant_fp4_packed(*quant.quant_fp4_packed(w))
  _assert_bits_equal(got, np.asarray(FP4.qdq(jnp.asarray(w), 32)))
  _assert_bits_equal(got, _ref_qdq(w, 32, FP4))
