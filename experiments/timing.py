"""Timing for the experiment scripts: seconds of synced runs after warm-up ones, and the ceilings a measurement is
held against in the same run (bf16 matmul rate, device copy bandwidth)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def run_times(fn, *args, steps: int, warmup: int = 1) -> list[float]:
  """Seconds of each of `steps` runs of fn(*args), outputs blocked on, after `warmup` runs (the first compiles);
  fn must not donate its inputs."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return times


def median_time(fn, *args, steps: int = 5, warmup: int = 1) -> float:
  """Median of `run_times`."""
  return float(np.median(run_times(fn, *args, steps=steps, warmup=warmup)))


def matmul_rate(n: int, *, steps: int = 10, warmup: int = 3, ones: bool = False) -> float:
  """bf16 [n, n] @ [n, n] FLOP/s, of random operands (or of ones)."""
  if ones:
    a = b = jnp.ones((n, n), jnp.bfloat16)
  else:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  return 2 * n ** 3 / median_time(jax.jit(lambda a, b: a @ b), a, b, steps=steps, warmup=warmup)


def copy_bandwidth(x, *, steps: int = 20, warmup: int = 3) -> float:
  """Device copy bandwidth in bytes/s (read + written) of one elementwise pass over the array x."""
  t = median_time(jax.jit(lambda x: x * 1.5), x, steps=steps, warmup=warmup)
  return 2 * x.size * x.dtype.itemsize / t
