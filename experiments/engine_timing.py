"""The serving engine's decode step timed as a server runs it: dsv4_jax.serve.engine.Engine over a CachedBackend,
`batch` streaming requests, each engine.step() = decode every slot, draw the tokens (greedy), stream them, check
stops and lengths; with dispatch-ahead (the default) or waiting for each step.

The slots' caches are synthetic (bench_serve.fill_synthetic) at `context` tokens: the requests are admitted with a
one-token prompt, then the backend's cache is swapped for a synthetic one of the same shape and its per-slot
lengths set to `context` (the two backend fields a bench may set; nothing of the engine is touched). The
tokenizer is a stub that maps each id to one character (no special tokens, no byte pieces): the host's
detokenizing is cheaper than with a real 129K-token BPE, so the host side here is a lower bound.
"""

from __future__ import annotations

import statistics
import time

import jax

from dsv4_jax.serve.cached_backend import CachedBackend
from dsv4_jax.serve.engine import Engine
from dsv4_jax.serve.params import SamplingParams


class CharTokenizer:
  """Stub: id i <-> one CJK-range character; no EOS (-1)."""
  eos_id = -1

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return "".join(chr(0x4E00 + int(i) % 20000) for i in ids)


def engine_backend(model, batch: int, max_len: int, kv_format: str) -> CachedBackend:
  return CachedBackend(model, batch, max_len, kv_format=kv_format)


def time_engine(backend: CachedBackend, fill, context: int, steps: int, warmup: int, dispatch_ahead: bool) -> dict:
  """Per engine.step() wall seconds (median and mean of `steps`, after the first decode step's compile and
  `warmup` steps) with every slot decoding at `context`. `fill(cache) -> cache`: the synthetic cache."""
  B = backend.num_slots
  engine = Engine(backend, CharTokenizer(), dispatch_ahead=dispatch_ahead)
  n_tokens = 2 + warmup + steps + 1
  if context + n_tokens > backend.max_len:
    raise ValueError(f"context {context} + {n_tokens} steps exceed the backend's max_len {backend.max_len}")
  handles = [engine.submit([1 + b], SamplingParams(max_tokens=n_tokens, seed=b, ignore_eos=True)) for b in range(B)]
  engine.step()  # admits every request: one-token prefills, first tokens drawn
  if sorted(r.slot for r in engine._running.values()) != list(range(B)):
    raise RuntimeError("not every request got a slot in the first step")
  backend.cache = fill(backend.cache)
  backend._lengths = [context] * B
  jax.block_until_ready(backend.cache)
  t = time.perf_counter()
  engine.step()  # the first decode step at this context: compile
  first = time.perf_counter() - t
  for _ in range(warmup):
    engine.step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    engine.step()
    times.append(time.perf_counter() - t)
  engine.run_until_idle()
  done = [h.result() for h in handles]
  if any(c.completion_tokens != n_tokens for c in done):
    raise RuntimeError(f"engine run: expected {n_tokens} tokens per request, got "
                       f"{sorted({c.completion_tokens for c in done})}")
  return dict(context=context, batch=B, dispatch_ahead=dispatch_ahead, step_s=statistics.median(times),
              mean_s=statistics.mean(times), first_s=first)
