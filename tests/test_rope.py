"""Tests for dsv4_jax.model.rope: YaRN / plain tables against the formula (float64), interleaved pairs on the
last dims, inverse rotation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.config import ModelConfig
from dsv4_jax.model import rope

FLASH = ModelConfig.preset("flash")


def _yarn_reference_f64():
  """Spec §4: theta 160000, YaRN factor 16, original length 65536, beta_fast 32, beta_slow 1, rope_dim 64."""
  dim, theta, factor, orig, b_fast, b_slow = 64, 160000.0, 16.0, 65536, 32.0, 1.0
  freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)

  def correction_dim(rotations):  # the dim index whose wavelength fits `rotations` times into orig
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(correction_dim(b_fast)), 0)
  high = min(math.ceil(correction_dim(b_slow)), dim - 1)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  smooth = 1.0 - ramp
  return low, high, freqs / factor * (1 - smooth) + freqs * smooth


def test_yarn_correction_range_for_flash():
  low, high, _ = _yarn_reference_f64()
  assert (low, high) == (15, 25)


def test_yarn_table_matches_formula():
  _, _, want = _yarn_reference_f64()
  got = rope.layer_frequencies(FLASH, compressed=True)
  assert got.shape == (32,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
  base = 160000.0 ** (-np.arange(0, 64, 2) / 64)
  np.testing.assert_allclose(got[:16], base[:16], rtol=2e-6)  # fast dims (ramp 0): untouched
  np.testing.assert_allclose(got[25:], base[25:] / 16, rtol=2e-6)  # slow dims (ramp 1): interpolated by 16
  assert np.all(got[16:25] < base[16:25]) and np.all(got[16:25] > base[16:25] / 16)


def test_swa_table_is_plain():
  got = rope.layer_frequencies(FLASH, compressed=False)
  np.testing.assert_allclose(got, 10000.0 ** (-np.arange(0, 64, 2, dtype=np.float64) / 64), rtol=2e-6)


def test_yarn_disabled_without_original_length():
  got = rope.rope_frequencies(64, 160000.0, yarn_factor=16.0, original_len=0)
  np.testing.assert_allclose(got, 160000.0 ** (-np.arange(0, 64, 2, dtype=np.float64) / 64), rtol=2e-6)


def test_rope_table_is_cos_sin_of_angles():
  freqs = rope.layer_frequencies(FLASH, compressed=True)
  pos = np.array([[0, 1, 7, 127, 128, 999]], np.int32)
  cos, sin = rope.rope_table(jnp.asarray(pos), freqs)
  angles = pos[..., None].astype(np.float64) * freqs.astype(np.float64)
  assert cos.shape == (1, 6, 32)
  np.testing.assert_allclose(np.asarray(cos), np.cos(angles), atol=1e-4)
  np.testing.assert_allclose(np.asarray(sin), np.sin(angles), atol=1e-4)


def _random(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(2, 5, 128), (2, 5, 3, 128)])
def test_rotate_matches_complex_multiply_on_last_dims(shape, np_ref):
  freqs = rope.layer_frequencies(FLASH, compressed=True)
  x = _random(shape)
  pos = np.random.default_rng(1).integers(0, 1000, shape[:2])
  got = np.asarray(rope.rotate(jnp.asarray(x), rope.rope_table(jnp.asarray(pos), freqs)))
  want = np_ref.rotate(x, pos, freqs.astype(np.float64))
  np.testing.assert_array_equal(got[..., :64], x[..., :64])  # NoPE dims bit-for-bit untouched
  np.testing.assert_allclose(got, want, atol=2e-4)  # float32 angles up to 1000 rad


def test_pairs_are_interleaved():
  """(x[2i], x[2i+1]) of the rope dims rotate together (GPT-J style), not (x[i], x[i + R/2])."""
  freqs = np.array([0.5, 0.25], np.float32)
  x = np.zeros((1, 1, 6), np.float32)
  x[..., 2] = 1.0  # first rope dim
  got = np.asarray(rope.rotate(jnp.asarray(x), rope.rope_table(jnp.full((1, 1), 3), freqs)))
  np.testing.assert_allclose(got[0, 0], [0, 0, math.cos(1.5), math.sin(1.5), 0, 0], atol=1e-6)


def test_inverse_round_trip_and_conjugate():
  freqs = rope.layer_frequencies(FLASH, compressed=False)
  x = jnp.asarray(_random((2, 7, 4, 128)))
  pos = jnp.asarray(np.random.default_rng(2).integers(0, 1000, (2, 7)))
  table = rope.rope_table(pos, freqs)
  back = rope.rotate(rope.rotate(x, table), table, inverse=True)
  np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=1e-5)
  np.testing.assert_allclose(np.asarray(rope.rotate(x, table, inverse=True)),
                             np.asarray(rope.rotate(x, rope.rope_table(-pos, freqs))), atol=1e-5)


def test_scores_depend_on_relative_position_only():
  freqs = rope.layer_frequencies(FLASH, compressed=True)
  q, k = jnp.asarray(_random((1, 1, 128), 3)), jnp.asarray(_random((1, 1, 128), 4))

  def score(tq, tk):
    rq = rope.rotate(q, rope.rope_table(jnp.full((1, 1), tq), freqs))
    rk = rope.rotate(k, rope.rope_table(jnp.full((1, 1), tk), freqs))
    return float(jnp.sum(rq * rk))

  assert score(10, 3) == pytest.approx(score(510, 503), abs=1e-4)
  assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)
