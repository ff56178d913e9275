"""Cached inference == the full forward: prefill of a prompt then decode of the rest, at every position, for all
layer types (SWA, CSA with indexer top-k, HCA) across window (16) and block (4, 128) boundaries; rows of one
batch at different lengths; chunked prefill (uneven chunks) == one prefill, logits and cache; QAT on with the
FP8 layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.config import ModelConfig
from dsv4_jax.serve.steps import make_decode, make_prefill

S = 300  # > 2 HCA blocks; the window is 16 tokens, CSA blocks 4
PROMPTS = (1, 133)  # row 0 decodes from position 1; row 1's prompt crosses the first HCA block
CHUNK = 64
CHUNKS = ((5, 1, 63, 64, 2, 37, 64, 64), (3, 64, 61, 1, 64, 4, 64, 39))  # per row, summing to S


def rel_errors(got_NV, want_NV):
  """Relative error of each position's logits."""
  return np.linalg.norm(got_NV - want_NV, axis=-1) / np.linalg.norm(want_NV, axis=-1)


class Run:
  """One model, its full-forward logits for two rows of S tokens, and jitted prefill / decode steps."""

  def __init__(self, model, seed=0):
    self.model, cfg = model, model.cfg
    self.tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, S)).astype(np.int32)
    forward = jax.jit(lambda t: model(t, with_mtp=False).logits)
    self.full = np.asarray(forward(jnp.asarray(self.tokens)))
    self.prefill, self.decode = make_prefill(model), make_decode(model)

  def cache(self, kv_format="float32", **kw):
    return self.model.init_cache(2, 384, kv_format=kv_format, page_tokens=128, **kw)

  def prompt_then_decode(self, kv_format="float32", prompts=PROMPTS):
    """[2, S, V] logits: each row's prompt in one prefill call, then one decode step per token (the row
    whose prompt is longer idles at the end), and the final cache."""
    cache = self.cache(kv_format)
    out = np.zeros(self.full.shape, np.float32)
    logits, cache = self.prefill(jnp.asarray(self.tokens), cache, jnp.asarray(prompts))
    for b, p in enumerate(prompts):
      out[b, :p] = np.asarray(logits[b, :p])
    pos = np.asarray(prompts)
    while np.any(pos < S):
      active = pos < S
      step = self.tokens[[0, 1], np.minimum(pos, S - 1)][:, None]
      logits, cache = self.decode(jnp.asarray(step), cache, jnp.asarray(active))
      for b in np.nonzero(active)[0]:
        out[b, pos[b]] = np.asarray(logits[b, 0])
      pos = pos + active
    np.testing.assert_array_equal(cache.lengths, [S, S])
    return out, cache


@pytest.fixture(scope="module", params=["tiny", "tiny-pro"])
def run(request, model_factory):
  return Run(model_factory(ModelConfig.preset(request.param)))


@pytest.fixture(scope="module")
def decoded(run):
  return run.prompt_then_decode()


def test_decode_matches_forward_at_every_position(run, decoded):
  out, cache = decoded
  err = rel_errors(out, run.full)
  worst = np.unravel_index(np.argmax(err), err.shape)
  assert err.max() <= 1e-4, f"row {worst[0]} position {worst[1]}: relative error {err.max():.2e}"
  assert not bool(cache.overflow)


def _sequence_entries(cache, pool, r):
  """Entries of layer r of a pool in each slot's sequence order [B, n, E] (through the page table)."""
  rows = np.asarray(pool)[r][np.maximum(np.asarray(cache.page_table), 0)]
  return rows.reshape(rows.shape[0], -1, rows.shape[-1])


def _assert_same_cache(a, b, tol=1e-5):
  np.testing.assert_array_equal(a.lengths, b.lengths)
  assert int(a.num_free) == int(b.num_free)
  for x, y in zip(jax.tree.leaves(a.states), jax.tree.leaves(b.states)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)
  for pa, pb in zip(jax.tree.leaves(a.pools), jax.tree.leaves(b.pools)):
    for r in range(pa.shape[0]):
      np.testing.assert_allclose(_sequence_entries(a, pa, r), _sequence_entries(b, pb, r), rtol=tol, atol=tol)


def test_chunked_prefill_equals_one_prefill(run, decoded):
  """Chunks of uneven sizes (one compiled width, per-row lengths) crossing window, block and page boundaries."""
  assert all(sum(c) == S for c in CHUNKS)
  cache = run.cache()
  pos = np.zeros(2, np.int64)
  out = np.zeros(run.full.shape, np.float32)
  for n in zip(*CHUNKS):
    tok = np.zeros((2, CHUNK), np.int32)
    for b in range(2):
      tok[b, :n[b]] = run.tokens[b, pos[b]:pos[b] + n[b]]
    logits, cache = run.prefill(jnp.asarray(tok), cache, jnp.asarray(n))
    for b in range(2):
      out[b, pos[b]:pos[b] + n[b]] = np.asarray(logits[b, :n[b]])
    pos += n
  one_logits, one = run.prefill(jnp.asarray(run.tokens), run.cache())
  assert rel_errors(np.asarray(one_logits), run.full).max() <= 1e-4
  assert rel_errors(out, np.asarray(one_logits)).max() <= 1e-4
  _assert_same_cache(cache, one)
  _assert_same_cache(decoded[1], one)  # and decoding token by token builds the same cache


def test_bad_inputs(run):
  model = run.model
  cache = model.init_cache(2, 64, kv_format="float32")
  with pytest.raises(ValueError, match="decode takes tokens"):
    model.decode(jnp.zeros((2, 3), jnp.int32), cache)
  with pytest.raises(ValueError, match="slots"):
    model.prefill(jnp.zeros((1, 3), jnp.int32), cache)
  with pytest.raises(ValueError, match="tokens must be"):
    model.prefill(jnp.zeros((3,), jnp.int32), cache)


# ----- QAT simulation on --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qat_run(model_factory):
  return Run(model_factory(ModelConfig.preset("tiny", simulate_quant=True)), seed=1)


def test_qat_decode(qat_run):
  """With simulate_quant the cached entries are already on the FP8 / FP4 grids, so the §8.1 layout stores them
  exactly: fp8 and bf16 storage give identical logits; what remains against the forward is (a) the bf16 RoPE
  dims of the layout in this float32 model and (b) FP8/FP4 rounding flips and top-k changes from last-bit
  differences of the decode-shaped matmuls (measured: 6e-7 to 2e-2 on the official-weight and random tiny
  models with float32 storage; 6e-2 to 1.1e-1 with the fp8 layout, argmax agreement 92-95%)."""
  fp8, _ = qat_run.prompt_then_decode("fp8")
  bf16, _ = qat_run.prompt_then_decode("bf16")
  np.testing.assert_array_equal(fp8, bf16)
  exact, _ = qat_run.prompt_then_decode("float32")
  rel = lambda a: np.linalg.norm(a - qat_run.full) / np.linalg.norm(qat_run.full)
  assert rel(exact) <= 3e-2, rel(exact)
  assert rel(fp8) <= 1.5e-1, rel(fp8)
  assert np.mean(fp8.argmax(-1) == qat_run.full.argmax(-1)) >= 0.9
