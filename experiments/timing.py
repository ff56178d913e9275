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


def device_time(fn, *args, steps: int = 5, warmup: int = 1, sync_above: float = 0.02,
                target: float = 0.05) -> float:
  """Seconds per call of fn(*args) as the device spends them. A synced call (median_time) also counts the
  host's dispatch and wait (~0.1 ms: half of a 0.1 ms kernel's figure), so calls shorter than `sync_above`
  are dispatched back to back, `target` seconds' worth before one wait, the median of `steps` such rounds;
  longer calls are timed synced, where that latency is under 0.5%. Inputs must not be donated."""
  once = median_time(fn, *args, steps=1, warmup=warmup)
  if once >= sync_above:
    return median_time(fn, *args, steps=steps, warmup=0)
  reps = max(3, min(500, int(target / once)))
  per_call = []
  for _ in range(steps):
    t = time.perf_counter()
    out = None
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t) / reps)
  return float(np.median(per_call))


def matmul_rate(n: int, *, steps: int = 10, warmup: int = 3, ones: bool = False) -> float:
  """bf16 [n, n] @ [n, n] FLOP/s, of random operands (or of ones)."""
  if ones:
    a = b = jnp.ones((n, n), jnp.bfloat16)
  else:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  return 2 * n ** 3 / device_time(jax.jit(lambda a, b: a @ b), a, b, steps=steps, warmup=warmup)


def copy_bandwidth(x, *, steps: int = 20, warmup: int = 3) -> float:
  """Device copy bandwidth in bytes/s (read + written) of one elementwise pass over the array x."""
  t = device_time(jax.jit(lambda x: x * 1.5), x, steps=steps, warmup=warmup)
  return 2 * x.size * x.dtype.itemsize / t
