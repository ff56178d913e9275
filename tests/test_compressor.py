"""Tests for dsv4_jax.model.compressor against a per-block Python loop written from spec §5.1 (m = 128) and
§5.2 (m = 4 with overlap), before and after the norm + RoPE, with packed documents and ragged lengths."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4_jax.config import ModelConfig
from dsv4_jax.model import context
from dsv4_jax.model.compressor import Compressor, quant_kv

CFG = ModelConfig.preset("tiny")


class Identity(nnx.Module):
  def __call__(self, x):
    return x


def make_compressor(ratio, head_dim, for_indexer=False, seed=0, cfg=CFG):
  comp = Compressor(cfg, ratio, head_dim, for_indexer=for_indexer, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  d = cfg.hidden_size
  comp.wkv[...] = jnp.asarray(rng.standard_normal(comp.wkv.shape) * d ** -0.5, jnp.float32)
  comp.wgate[...] = jnp.asarray(rng.standard_normal(comp.wgate.shape) * 2 * d ** -0.5, jnp.float32)
  comp.ape[...] = jnp.asarray(rng.standard_normal(comp.ape.shape), jnp.float32)
  comp.norm.weight[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(head_dim), jnp.float32)
  return comp


@nnx.jit
def run(comp, x, segment):
  positions = context.document_positions(segment)
  layout = context.block_layout(positions, segment, comp.ratio)
  return comp(x, positions, layout), layout.valid_BN


def docs(segment_S):
  out, start = [], 0
  for t in range(1, len(segment_S) + 1):
    if t == len(segment_S) or segment_S[t] != segment_S[t - 1]:
      out.append((start, t - start))
      start = t
  return out


def pooled_reference(x_SD, segment_S, comp):
  """[(pooled entry, block index)] per complete block of each document, in order; a loop over blocks and rows."""
  m, c = comp.ratio, comp.head_dim
  kv = x_SD.astype(np.float64) @ np.asarray(comp.wkv[...], np.float64)
  z = x_SD.astype(np.float64) @ np.asarray(comp.wgate[...], np.float64)
  ape = np.asarray(comp.ape[...], np.float64)
  out = []
  for s0, n in docs(segment_S):
    for i in range(n // m):
      logits, values = [], []
      if comp.overlap:
        # §5.2: the block's own tokens through the second half [c:], the previous block's through [:c];
        # block 0 of a document has no previous block (its b-half is -inf / 0).
        for r in range(m):
          j = s0 + m * i + r
          logits.append(z[j, c:] + ape[r, c:])
          values.append(kv[j, c:])
        if i > 0:
          for r in range(m):
            j = s0 + m * (i - 1) + r
            logits.append(z[j, :c] + ape[r, :c])
            values.append(kv[j, :c])
      else:
        for r in range(m):  # §5.1
          j = s0 + m * i + r
          logits.append(z[j] + ape[r])
          values.append(kv[j])
      logits, values = np.stack(logits), np.stack(values)
      weights = np.exp(logits - logits.max(0))
      weights /= weights.sum(0)
      out.append(((weights * values).sum(0), i))
  return out


def check(comp, x_BSD, segment_BS, np_ref, *, normed=True):
  got, valid = run(comp, jnp.asarray(x_BSD), jnp.asarray(segment_BS))
  got, valid = np.asarray(got), np.asarray(valid)
  freqs = np_ref.layer_freqs(CFG, compressed=True)
  for b in range(x_BSD.shape[0]):
    ref = pooled_reference(x_BSD[b], segment_BS[b], comp)
    assert valid[b].sum() == len(ref) and valid[b, :len(ref)].all()
    if not ref:
      continue
    pooled = np.stack([p for p, _ in ref])
    blocks = np.array([i for _, i in ref])
    if normed:
      pooled = np_ref.rms_norm(pooled, comp.norm.weight[...], CFG.rms_norm_eps)
    want = np_ref.rotate(pooled, blocks * comp.ratio, freqs)  # RoPE at the block's first position i·m
    np.testing.assert_allclose(got[b, :len(ref)], want, rtol=2e-5, atol=2e-5)


def random_x(B, S, seed=0):
  return np.random.default_rng(seed).standard_normal((B, S, CFG.hidden_size)).astype(np.float32)


@pytest.fixture(scope="module")
def csa():
  return make_compressor(4, CFG.head_dim)


@pytest.fixture(scope="module")
def csa_pooled_only():
  comp = make_compressor(4, CFG.head_dim)
  comp.norm = Identity()
  return comp


@pytest.fixture(scope="module")
def hca():
  return make_compressor(128, CFG.head_dim, seed=1)


@pytest.mark.parametrize("S", [23, 24, 3])
def test_csa_single_document(csa, csa_pooled_only, np_ref, S):
  x, seg = random_x(2, S), np.zeros((2, S), np.int32)
  check(csa, x, seg, np_ref)
  check(csa_pooled_only, x, seg, np_ref, normed=False)


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 29), max_size=4, unique=True), seed=st.integers(0, 1000))
def test_csa_packed_documents(csa, csa_pooled_only, np_ref, cuts, seed):
  lengths = np.diff([0] + sorted(cuts) + [30])
  seg = np.concatenate([np.full(n, d, np.int32) for d, n in enumerate(lengths)])[None]
  x = random_x(1, 30, seed)
  check(csa, x, seg, np_ref)
  check(csa_pooled_only, x, seg, np_ref, normed=False)


@pytest.mark.parametrize("lengths", [[300], [130, 270], [127, 129, 20]])
def test_hca_blocks(hca, np_ref, lengths):
  seg = np.concatenate([np.full(n, d, np.int32) for d, n in enumerate(lengths)])[None]
  x = random_x(1, seg.shape[1], 3)
  check(hca, x, seg, np_ref)


def test_hca_pooled_before_norm(np_ref):
  comp = make_compressor(128, CFG.head_dim, seed=2)
  comp.norm = Identity()
  seg = np.array([[0] * 140 + [1] * 150], np.int32)
  check(comp, random_x(1, 290, 4), seg, np_ref, normed=False)


def test_indexer_compressor(np_ref):
  """The indexer's keys use the same overlapped m = 4 pooling at index_head_dim (here all dims are RoPE dims)."""
  comp = make_compressor(4, CFG.index_head_dim, for_indexer=True, seed=5)
  seg = np.array([[0] * 13 + [1] * 11], np.int32)
  check(comp, random_x(1, 24, 6), seg, np_ref)


def test_block_zero_ignores_previous_document(csa):
  """Changing document 1 leaves every entry of document 2 unchanged (no overlap across the boundary)."""
  seg = np.array([[0] * 10 + [1] * 14], np.int32)
  x = random_x(1, 24, 7)
  y = x.copy()
  y[:, :10] += 5.0
  a, valid = run(csa, jnp.asarray(x), jnp.asarray(seg))
  b, _ = run(csa, jnp.asarray(y), jnp.asarray(seg))
  doc2 = np.asarray(valid)[0].copy()
  doc2[:2] = False  # document 1's two complete blocks
  np.testing.assert_array_equal(np.asarray(a)[0, doc2], np.asarray(b)[0, doc2])
  assert not np.allclose(np.asarray(a)[0, :2], np.asarray(b)[0, :2])


@pytest.mark.parametrize("for_indexer", [False, True])
def test_simulated_quant_is_applied_last(for_indexer):
  from dsv4_jax.model import quant  # noqa: PLC0415

  head_dim = CFG.index_head_dim if for_indexer else CFG.head_dim
  plain = make_compressor(4, head_dim, for_indexer=for_indexer, seed=8)
  qat = make_compressor(4, head_dim, for_indexer=for_indexer, seed=8, cfg=CFG.replace(simulate_quant=True))
  x, seg = jnp.asarray(random_x(1, 16, 9)), jnp.zeros((1, 16), jnp.int32)
  want = run(plain, x, seg)[0]
  want = quant.fp4_e2m1_qdq(quant.hadamard(want), 32) if for_indexer else quant_kv(want, CFG)
  got, want = np.asarray(run(qat, x, seg)[0]), np.asarray(want)
  # The two paths may fuse differently, so an input one ulp off can round to the neighbouring grid value.
  assert np.mean(got == want) > 0.99
  assert not np.array_equal(got, np.asarray(run(plain, x, seg)[0]))
