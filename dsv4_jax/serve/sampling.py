"""Token sampling from next-token logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def sample(logits_BV, key, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """One token per row [B] int32. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    cutoff_idx_B1 = jnp.sum(cum_BV < top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx_B1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def pick_tokens(logits_BV, seeds_B, positions_B, temperature_B, top_k_B, top_p_B, *, greedy_only: bool = False):
  """One token per row [B] int32, each row with its own sampling parameters (traceable; `sample_rows` jitted).

  Row b draws with key fold_in(key(seeds_B[b]), positions_B[b]), so a request's samples depend only on its own
  seed and the index of the token it generates, not on the batch around it. Same rules as `sample` per row
  (temperature 0 = greedy; top_k 0 = off; top_p 1 = off; top-k is applied before top-p). `greedy_only` (static):
  every row has temperature 0, so only the argmax is computed (no sorts of the vocabulary).
  """
  if greedy_only:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def one(logits_V, seed, position, temperature, top_k, top_p):
    logits_V = logits_V.astype(jnp.float32)
    greedy = jnp.argmax(logits_V).astype(jnp.int32)
    x_V = logits_V / jnp.where(temperature > 0, temperature, 1.0)
    sorted_V = jnp.sort(x_V)[::-1]
    kth = sorted_V[jnp.clip(top_k - 1, 0, x_V.shape[0] - 1)]
    x_V = jnp.where((top_k > 0) & (x_V < kth), -jnp.inf, x_V)
    # the top-k-masked values in descending order without a second sort: masking by value keeps the order
    sorted_V = jnp.where((top_k > 0) & (sorted_V < kth), -jnp.inf, sorted_V)
    cum_V = jnp.cumsum(jax.nn.softmax(sorted_V))
    cutoff = sorted_V[jnp.minimum(jnp.sum(cum_V < top_p), x_V.shape[0] - 1)]
    x_V = jnp.where((top_p < 1) & (x_V < cutoff), -jnp.inf, x_V)
    key = jax.random.fold_in(jax.random.key(seed), position)
    drawn = jax.random.categorical(key, x_V).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  return jax.vmap(one)(logits_BV, jnp.asarray(seeds_B, jnp.uint32), jnp.asarray(positions_B, jnp.int32),
                       jnp.asarray(temperature_B, jnp.float32), jnp.asarray(top_k_B, jnp.int32),
                       jnp.asarray(top_p_B, jnp.float32))


@jax.jit
def sample_rows(logits_BV, seeds_B, positions_B, temperature_B, top_k_B, top_p_B):
  """`pick_tokens` jitted (all rows through the full sampler): the engine's batched sampler."""
  return pick_tokens(logits_BV, seeds_B, positions_B, temperature_B, top_k_B, top_p_B)


@dataclasses.dataclass(frozen=True)
class SamplingRows:
  """Per-row sampling arguments of a fixed-size batch as host arrays (the order `pick_tokens` takes them); rows
  without a request get greedy defaults. `greedy_only`: no row samples (the sampler can skip the sorts)."""
  seeds: np.ndarray  # [B] uint32
  positions: np.ndarray  # [B] int32: the index of the token each row draws
  temperature: np.ndarray  # [B] float32
  top_k: np.ndarray  # [B] int32
  top_p: np.ndarray  # [B] float32

  @classmethod
  def build(cls, size: int, rows: dict) -> SamplingRows:
    """rows: {row index: (SamplingParams, token index)}; the other rows of `size` stay greedy."""
    seeds, positions = np.zeros(size, np.uint32), np.zeros(size, np.int32)
    temperature, top_k, top_p = np.zeros(size, np.float32), np.zeros(size, np.int32), np.ones(size, np.float32)
    for row, (params, position) in rows.items():
      seeds[row], positions[row] = params.seed % 2**32, position
      temperature[row], top_k[row], top_p[row] = params.temperature, params.top_k, params.top_p
    return cls(seeds, positions, temperature, top_k, top_p)

  @property
  def arrays(self) -> tuple:
    return self.seeds, self.positions, self.temperature, self.top_k, self.top_p

  @property
  def greedy_only(self) -> bool:
    return not bool(np.any(self.temperature > 0))
