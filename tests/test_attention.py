"""Tests for dsv4_jax.model.attention (spec §4, §7): each layer type against a dense masked attention written
in numpy (weightless per-head q norm, RoPE on the last dims, shared K=V, sink, inverse RoPE, grouped output)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.model import context
from dsv4_jax.model.attention import Attention

CFG = ModelConfig.preset("tiny")
H, C, G, W = CFG.num_attention_heads, CFG.head_dim, CFG.o_groups, CFG.sliding_window
# Per ratio: document lengths (S not a multiple of m; HCA with several blocks per document).
LENGTHS = {0: [19, 22], 4: [27, 30], 128: [140, 270]}


def make_layer(ratio, seed=0):
  layer = Attention(CFG, ratio, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for norm in (layer.q_norm, layer.kv_norm):
    norm.weight[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(norm.weight.shape), jnp.float32)
  layer.attn_sink[...] = jnp.asarray(rng.standard_normal(H), jnp.float32)
  return layer


@pytest.fixture(scope="module", params=[0, 4, 128], ids=["swa", "csa", "hca"])
def case(request):
  ratio = request.param
  seg = np.concatenate([np.full(n, d, np.int32) for d, n in enumerate(LENGTHS[ratio])])[None]
  x = np.random.default_rng(ratio + 1).standard_normal(seg.shape + (CFG.hidden_size,)).astype(np.float32)
  return ratio, make_layer(ratio), x, seg


@nnx.jit
def forward(layer, x, seg, positions):
  ctx = context.make_context(CFG, jnp.zeros(seg.shape, jnp.int32), segment_ids=seg, positions=positions)
  return layer(x, ctx)[0]


@nnx.jit
def compressed_candidates(layer, x, seg):
  """The layer's compressed entries and the indices it may attend (indexer picks or all visible)."""
  ctx = context.make_context(CFG, jnp.zeros(seg.shape, jnp.int32), segment_ids=seg)
  layout = ctx.layouts[layer.ratio]
  entries = layer.compressor(x, ctx.positions_BS, layout)
  S = x.shape[1]
  if layer.indexer is not None:
    qr = layer.q_norm(jnp.einsum("BSD,DQ->BSQ", x, layer.wq_a[...]))
    return entries, layer.indexer(x, qr, ctx, offset=S) - S
  return entries, layout.visible_indices_BSN(ctx.segment_BS, offset=0)


def attention_np(layer, x_SD, seg_S, entries_NC, picks_SK, np_ref):
  """Dense [S, S + N] masked softmax with the sink; compressed candidates are the layer's own picks."""
  ratio = layer.ratio
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  S = x_SD.shape[0]
  pos = np.concatenate([np.arange(n) for n in np.unique(seg_S, return_counts=True)[1]])
  freqs = np_ref.layer_freqs(CFG, compressed=bool(ratio))
  x = f64(x_SD)
  qr = np_ref.rms_norm(x @ f64(layer.wq_a[...]), layer.q_norm.weight[...], CFG.rms_norm_eps)
  q = np_ref.rms_norm(np.einsum("sq,qhc->shc", qr, f64(layer.wq_b[...])), None, CFG.rms_norm_eps)
  q = np_ref.rotate(q, pos, freqs)
  kv = np_ref.rotate(np_ref.rms_norm(x @ f64(layer.wkv[...]), layer.kv_norm.weight[...], CFG.rms_norm_eps),
                     pos, freqs)
  keys = [kv]
  t, j = np.arange(S)[:, None], np.arange(S)[None, :]
  masks = [(j <= t) & (j > t - W) & (seg_S[:, None] == seg_S[None, :])]  # window: last W tokens of the document
  if ratio:
    keys.append(f64(entries_NC))
    n = entries_NC.shape[0]
    masks.append(np.stack([np.isin(np.arange(n), picks_SK[s][picks_SK[s] >= 0]) for s in range(S)]))
  keys, mask = np.concatenate(keys), np.concatenate(masks, axis=1)
  logits = np.einsum("shc,tc->sht", q, keys) * C ** -0.5
  logits = np.where(mask[:, None, :], logits, -np.inf)
  sink = f64(layer.attn_sink[...])[None, :, None]
  top = np.maximum(logits.max(-1, keepdims=True), sink)
  p = np.exp(logits - top)
  p = p / (p.sum(-1, keepdims=True) + np.exp(sink - top))
  o = np_ref.rotate(np.einsum("sht,tc->shc", p, keys), pos, freqs, inverse=True)
  o = o.reshape(S, G, H * C // G)
  z = np.einsum("sgi,gir->sgr", o, f64(layer.wo_a[...]))
  return np.einsum("sgr,grd->sd", z, f64(layer.wo_b[...]))


def test_matches_dense_numpy(case, np_ref):
  ratio, layer, x, seg = case
  got = np.asarray(forward(layer, jnp.asarray(x), jnp.asarray(seg), None))
  entries, picks = np.zeros((0, C)), None
  if ratio:
    entries, picks = (np.asarray(a)[0] for a in compressed_candidates(layer, jnp.asarray(x), jnp.asarray(seg)))
    assert (picks >= 0).sum(-1).max() >= 2  # the compressed branch takes part
  want = attention_np(layer, x[0], seg[0], entries, picks, np_ref)
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_compressed_branch_matters(case):
  """Other compressed entries change exactly the outputs of queries that see a complete block."""
  ratio, layer, x, seg = case
  if not ratio:
    pytest.skip("SWA layers have no compressed branch")
  base = np.asarray(forward(layer, jnp.asarray(x), jnp.asarray(seg), None))
  other = make_layer(ratio)
  other.compressor.wkv[...] = layer.compressor.wkv[...] * 0.5 + 0.1
  moved = np.asarray(forward(other, jnp.asarray(x), jnp.asarray(seg), None))
  first_block_seen = ratio - 1
  np.testing.assert_array_equal(moved[0, :first_block_seen], base[0, :first_block_seen])
  assert not np.allclose(moved[0, first_block_seen:], base[0, first_block_seen:])


def test_relative_positions_only(case):
  """Shifting every position by a multiple of the block sizes leaves the output unchanged (RoPE is undone)."""
  ratio, layer, x, seg = case
  pos = context.document_positions(jnp.asarray(seg))
  base = np.asarray(forward(layer, jnp.asarray(x), jnp.asarray(seg), pos))
  shifted = np.asarray(forward(layer, jnp.asarray(x), jnp.asarray(seg), pos + 256))
  np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4 * np.abs(base).max())
  if ratio == 0:  # no blocks: any shift
    shifted = np.asarray(forward(layer, jnp.asarray(x), jnp.asarray(seg), pos + 3))
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4 * np.abs(base).max())
