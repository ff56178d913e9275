"""Tests for reading the fp8 KV-cache layout (spec §8.1) back: `unpack_keys` / `unpack_entries` against a table
decode written here, bit for bit, on rows holding every byte value in every position; and that the decode
compiles without gathers (so XLA can fuse it into the score matmul)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax.model import kv_format as kvf
from dsv4_jax.model import quant
from pallas_kernels.paged_index_scores import fp4

# e2m1 code -> value, sign in bit 3 (code 8 is -0.0), written out independently of quant.FP4_E2M1_VALUES.
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)
# Does this backend flush float32 subnormal products to zero (XLA:CPU does)? The reference then does too.
FLUSHES = float(jax.jit(lambda a, b: a * b)(np.float32(0.5), np.float32(2.0**-126))) == 0.0


def _scale(byte):
  """ue8m0 byte -> scale: 2**(b - 127); the packer never writes 0 or 255, which read as the float32 exponent
  field would (0.0, inf)."""
  b = byte.astype(np.float64)
  return np.where(byte == 0, 0.0, np.where(byte == 255, np.inf, np.exp2(b - 127)))


def _to(x64, dtype):
  """Exact float64 products -> float32 (overflow to inf, subnormals flushed where the backend flushes), then
  `dtype`."""
  with np.errstate(over="ignore", invalid="ignore"):
    x = x64.astype(np.float32)
  if FLUSHES:
    x = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), x), x)
  return x.astype(ml_dtypes.bfloat16) if dtype == jnp.bfloat16 else x


def ref_keys(rows, dtype):
  """[N, 68] bytes -> [N, 128]: nibble pairs (low = even dim) through the table, times each 32-block's scale."""
  codes = np.stack([rows[:, :64] & 0xF, rows[:, :64] >> 4], -1).reshape(-1, 128)
  with np.errstate(invalid="ignore"):
    return _to(E2M1[codes] * np.repeat(_scale(rows[:, 64:68]), 32, axis=1), dtype)


def ref_entries(rows, dtype):
  """[N, 584] bytes -> [N, 512]: e4m3 NoPE times each 64-block's scale, then the bf16 RoPE dims."""
  nope = rows[:, :448].view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  with np.errstate(invalid="ignore"):
    nope = _to(nope * np.repeat(_scale(rows[:, 576:583]), 64, axis=1), dtype)
  rope = rows[:, 448:576].copy().view("<u2").view(ml_dtypes.bfloat16).astype(np.float32)
  with np.errstate(invalid="ignore"):
    return np.concatenate([nope, rope.astype(nope.dtype)], axis=1)


def every_byte_rows(width, seed):
  """Rows in which every column takes all 256 byte values (twice, in two pairings), plus random rows."""
  i, j = np.arange(256)[:, None], np.arange(width)[None]
  rng = np.random.default_rng(seed)
  return np.concatenate([(i + 37 * j) % 256, (3 * i + j) % 256, rng.integers(0, 256, (512, width))]).astype(np.uint8)


def assert_bits_equal(got, want):
  """Bit for bit (so -0.0 != 0.0); NaNs only need to be NaN in the same places (their payload is the
  platform's)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
  nan = np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
  u = np.uint16 if got.dtype.itemsize == 2 else np.uint32
  bad = (got.view(u) != want.view(u)) & ~nan
  assert not bad.any(), f"{bad.sum()} values differ, first at {np.argwhere(bad)[0]}: {got[bad][:4]} vs {want[bad][:4]}"


def test_e2m1_decode_is_the_table():
  got = np.asarray(fp4.e2m1_value(jnp.arange(16, dtype=jnp.uint8)))
  np.testing.assert_array_equal(got.view(np.uint32), E2M1.astype(np.float32).view(np.uint32))
  np.testing.assert_array_equal(got.view(np.uint32), quant.FP4_E2M1_VALUES.view(np.uint32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("jit", [False, True])
def test_unpack_keys_bit_for_bit(dtype, jit):
  rows = every_byte_rows(68, seed=0)
  # Named corners: -0.0 in both nibbles, the largest finite scale (254: 0.5 -> 2**126, 6 -> inf), the smallest
  # written scale (1: 0.5 -> 2**-127, a float32 subnormal), and the never-written 0 and 255.
  corners = np.zeros((5, 68), np.uint8)
  corners[:, :64] = [[0x88], [0x71], [0x21], [0x98], [0x80]]
  corners[:, 64:] = [[127], [254], [1], [0], [255]]
  rows = np.concatenate([rows, corners])
  unpack = lambda r: kvf.unpack_keys(r, 128, "fp8", dtype)
  got = (jax.jit(unpack) if jit else unpack)(jnp.asarray(rows))
  want = ref_keys(rows, dtype)
  assert_bits_equal(got, want)
  c = want[-5:].astype(np.float32)
  assert np.all((c[0] == 0) & np.signbit(c[0]))  # 0x88: -0.0 -0.0
  assert c[1, 0] == 2.0**126 and np.isinf(c[1, 1]) and np.all(np.isnan(c[4]))  # 0x71 at scale 254; ±0 · inf


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("jit", [False, True])
def test_unpack_entries_bit_for_bit(dtype, jit):
  rows = every_byte_rows(584, seed=1)
  # Every bf16 bit pattern once in the RoPE dims (1024 rows of 64), NoPE bytes 0x80 (-0.0) at scale 254.
  rope = np.zeros((1024, 584), np.uint8)
  rope[:, :448], rope[:, 576:583] = 0x80, 254
  rope[:, 448:576] = np.arange(65536, dtype="<u2").view(np.uint8).reshape(1024, 128)
  rows = np.concatenate([rows, rope])
  unpack = lambda r: kvf.unpack_entries(r, 512, 64, "fp8", dtype)
  got = (jax.jit(unpack) if jit else unpack)(jnp.asarray(rows))
  want = ref_entries(rows, dtype)
  assert_bits_equal(got, want)
  assert np.all(np.signbit(want[-1, :448].astype(np.float32)))


@pytest.mark.parametrize("fmt, dtype", [("bf16", jnp.bfloat16), ("float32", jnp.float32)])
def test_plain_formats_read_back_as_stored(fmt, dtype):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 128)), dtype)
  for got in (kvf.unpack_keys(x, 128, fmt, jnp.float32), kvf.unpack_entries(x, 128, 64, fmt, jnp.float32)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x, np.float32))


def test_unpack_compiles_without_gathers():
  """The fp8 decode is arithmetic on the bytes: no table gather left in the optimized HLO of a consumer."""
  keys = jax.ShapeDtypeStruct((2, 256, 68), jnp.uint8)
  q = jax.ShapeDtypeStruct((2, 4, 128), jnp.bfloat16)
  score = lambda r, q: jnp.einsum("bnc,bhc->bhn", kvf.unpack_keys(r, 128, "fp8", jnp.bfloat16), q)
  entries = jax.ShapeDtypeStruct((2, 256, 584), jnp.uint8)
  q_e = jax.ShapeDtypeStruct((2, 4, 512), jnp.bfloat16)
  attend = lambda r, q: jnp.einsum("bnc,bhc->bhn", kvf.unpack_entries(r, 512, 64, "fp8", jnp.bfloat16), q)
  for f, args in ((score, (keys, q)), (attend, (entries, q_e))):
    hlo = jax.jit(f).lower(*args).compile().as_text()
    assert "gather(" not in hlo and "dot(" in hlo
