"""Rotary embeddings on the last `rope_dim` dims, interleaved pairs (spec §4 "RoPE variant").

SWA-only layers use plain RoPE with `rope_theta`; CSA/HCA layers use `compress_rope_theta` with YaRN frequency
interpolation (no mscale). Tables are cos/sin of shape [..., rope_dim // 2], computed in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def rope_frequencies(rope_dim: int, theta: float, *, yarn_factor: float = 1.0, original_len: int = 0,
                     beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
  """Inverse frequencies [rope_dim // 2] (float32); YaRN-interpolated when `original_len > 0`."""
  freqs = 1.0 / (theta ** (np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)))
  freqs = freqs.astype(np.float32)
  if original_len > 0:
    def correction_dim(rotations):
      return rope_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    smooth = (1 - ramp).astype(np.float32)
    freqs = (freqs / np.float32(yarn_factor) * (1 - smooth) + freqs * smooth).astype(np.float32)
  return freqs


def layer_frequencies(cfg, compressed: bool) -> np.ndarray:
  """The table a layer uses: YaRN + compress theta in CSA/HCA layers, plain theta in SWA-only layers."""
  if compressed:
    return rope_frequencies(cfg.qk_rope_head_dim, cfg.compress_rope_theta, yarn_factor=cfg.rope_factor,
                            original_len=cfg.original_max_position_embeddings, beta_fast=cfg.beta_fast,
                            beta_slow=cfg.beta_slow)
  return rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta)


def rope_table(positions, freqs):
  """(cos, sin) of shape positions.shape + [rope_dim // 2] for integer positions."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32)
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x, table, *, inverse: bool = False):
  """Rotates the last 2·len(freqs) dims of x by the position table; `inverse` rotates back (conjugate).

  x: [B, S, ..., D]; table: cos/sin [B, S, R/2], broadcast over the middle (head) axes.
  """
  cos, sin = table
  rope_dim = 2 * cos.shape[-1]
  extra = x.ndim - cos.ndim
  cos = cos.reshape(cos.shape[:2] + (1,) * (extra) + cos.shape[2:])
  sin = sin.reshape(sin.shape[:2] + (1,) * (extra) + sin.shape[2:])
  if inverse:
    sin = -sin
  nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
  pairs = rope.astype(jnp.float32).reshape(rope.shape[:-1] + (rope_dim // 2, 2))
  real, imag = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  rotated = rotated.reshape(rope.shape).astype(x.dtype)
  return jnp.concatenate([nope, rotated], axis=-1)
