"""Queries in chunks for lax.scan / lax.map: [B, S, ...] padded to whole chunks and split to [n, B, C, ...], and
back. The references and the pure-JAX backwards use it to bound memory by one chunk's gathers or scores."""

from __future__ import annotations

import jax.numpy as jnp


def split_queries(x_BS, chunk: int, value=0):
  """[B, S, ...] -> [n, B, C, ...] with C = chunk and n = ceil(S / C); the padding queries hold `value`."""
  B, S = x_BS.shape[:2]
  n = -(-S // chunk)
  x_BS = jnp.pad(x_BS, ((0, 0), (0, n * chunk - S)) + ((0, 0),) * (x_BS.ndim - 2), constant_values=value)
  return x_BS.reshape((B, n, chunk) + x_BS.shape[2:]).swapaxes(0, 1)


def merge_queries(x_nBC, S: int):
  """[n, B, C, ...] -> [B, S, ...]: the inverse of split_queries, padding queries dropped."""
  n, B, C = x_nBC.shape[:3]
  return x_nBC.swapaxes(0, 1).reshape((B, n * C) + x_nBC.shape[3:])[:, :S]
