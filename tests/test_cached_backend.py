"""CachedBackend's max_context buckets: steps read only the pages a bucket can hold, and the logits stay those of
the full forward while the sequences cross bucket, window and compression-block boundaries."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.serve import cached_backend
from dsv4_jax.serve.cached_backend import CachedBackend


def test_context_bucket_rounds_up_within_limits(tiny_model, monkeypatch):
  monkeypatch.setattr(cached_backend, "MIN_CONTEXT_BUCKET", 16)
  backend = CachedBackend(tiny_model, 1, 100, kv_format="float32")
  assert [backend._context_bucket(n) for n in (1, 16, 17, 33, 64, 65, 100)] == [16, 16, 32, 64, 64, 100, 100]


def test_bucketed_steps_equal_the_full_forward(tiny_model, monkeypatch):
  """Two slots of different lengths decode past 128 tokens (an HCA block) with buckets 16 → 256."""
  monkeypatch.setattr(cached_backend, "MIN_CONTEXT_BUCKET", 16)
  rng = np.random.default_rng(0)
  V = tiny_model.cfg.vocab_size
  prompts = [list(rng.integers(2, V, 9)), list(rng.integers(2, V, 30))]
  backend = CachedBackend(tiny_model, 2, 192, kv_format="float32", bucket=16)
  seqs, got = [list(p) for p in prompts], [[], []]
  for slot, p in enumerate(prompts):
    got[slot].append(np.asarray(backend.prefill(slot, p)))
  for _ in range(110):
    nxt = [int(rng.integers(2, V)) for _ in range(2)]
    logits = np.asarray(backend.decode([0, 1], nxt))
    for slot in range(2):
      seqs[slot].append(nxt[slot])
      got[slot].append(logits[slot])
  assert backend._context_bucket(len(seqs[1])) == 192  # the longest row crossed 16, 32, 64, 128 buckets
  for slot in range(2):
    n = len(prompts[slot])
    full = np.asarray(tiny_model(jnp.asarray([seqs[slot]], jnp.int32)).logits[0])[n - 1:]
    want = full[:len(got[slot])]
    rel = np.linalg.norm(np.stack(got[slot]) - want) / np.linalg.norm(want)
    assert rel < 1e-4, (slot, rel)
