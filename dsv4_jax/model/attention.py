"""Shared-KV multi-query attention (spec §4, §7) for the three layer types.

One 512-dim K=V head for all query heads; one softmax (with a per-head sink) over the sliding window of raw
tokens plus, in CSA layers, the indexer's top-k compressed entries, or in HCA layers every visible compressed
entry. Queries are low-rank, per-head RMS-normed without weight; RoPE sits on the last dims and is undone on
the output at the query position; the output projection is grouped low-rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from dsv4_jax.model import kernel_sharding, rope
from dsv4_jax.model.common import RMSNorm, param, rms_normalize
from dsv4_jax.model.compressor import Compressor, quant_kv
from dsv4_jax.model.indexer import Indexer


class Attention(nnx.Module):

  def __init__(self, cfg, ratio: int, *, rngs: nnx.Rngs):
    self.cfg, self.ratio = cfg, ratio
    pdt = jnp.dtype(cfg.param_dtype)
    d, h, c, g = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
    self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), pdt)
    self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.wq_b = param(rngs, (cfg.q_lora_rank, h, c), ("q_lora", "heads", "head_dim"), pdt)
    self.wkv = param(rngs, (d, c), ("embed", "head_dim"), pdt)
    self.kv_norm = RMSNorm(c, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.wo_a = param(rngs, (g, h * c // g, cfg.o_lora_rank), ("o_groups", "o_group_in", "o_lora"), pdt,
                      std=(h * c // g) ** -0.5)
    self.wo_b = param(rngs, (g, cfg.o_lora_rank, d), ("o_groups", "o_lora", "embed"), pdt,
                      std=(g * cfg.o_lora_rank) ** -0.5)
    self.attn_sink = param(rngs, (h,), ("heads",), jnp.float32, std=1.0)
    self.compressor = Compressor(cfg, ratio, c, for_indexer=False, rngs=rngs) if ratio else None
    self.indexer = Indexer(cfg, rngs=rngs) if ratio == 4 else None

  def __call__(self, x_BSD, ctx):
    cfg = self.cfg
    S = x_BSD.shape[1]
    table = ctx.rope_yarn if self.ratio else ctx.rope_plain
    qr_BSQ, q_BSHC = self.queries(x_BSD, table)
    kv_BSC = self.window_kv(x_BSD, table)
    q_BSHC = checkpoint_name(q_BSHC, "attn_q")
    kv_BSC = checkpoint_name(kv_BSC, "attn_kv")

    indices_BSK = ctx.window_BSW
    keys_BTC = kv_BSC
    picked_BSK = scores_BSK = None
    if self.ratio:
      layout = ctx.layouts[self.ratio]
      entries_BNC = self.compressor(x_BSD, ctx.positions_BS, layout).astype(x_BSD.dtype)
      picked_BSK, scores_BSK = self.pick_entries(x_BSD, qr_BSQ, ctx, entries_BNC.shape[1], offset=S)
      indices_BSK = jnp.concatenate([indices_BSK, picked_BSK], axis=-1)
      keys_BTC = jnp.concatenate([kv_BSC, entries_BNC], axis=1)

    o_BSHC, lse_BSH = self.attend(q_BSHC, keys_BTC, indices_BSK)
    aux = {}
    if scores_BSK is not None and ctx.opts.indexer_loss:
      aux["indexer_kl"] = indexer_kl(q_BSHC, entries_BNC, lse_BSH, picked_BSK - S, scores_BSK,
                                     cfg.head_dim ** -0.5)
    return self.output(o_BSHC, table), aux

  def queries(self, x_BSD, table):
    """(q latent c_Q [B, S, q_lora] (also the indexer's input), RMS-normed RoPE'd queries [B, S, H, C])."""
    cfg, dt = self.cfg, x_BSD.dtype
    qr_BSQ = self.q_norm(jnp.einsum("BSD,DQ->BSQ", x_BSD, self.wq_a[...].astype(dt)))
    q_BSHC = jnp.einsum("BSQ,QHC->BSHC", qr_BSQ, self.wq_b[...].astype(dt))
    return qr_BSQ, rope.rotate(rms_normalize(q_BSHC, cfg.rms_norm_eps).astype(dt), table)

  def window_kv(self, x_BSD, table):
    """The raw K=V entry of every token [B, S, C]: normed, RoPE'd, FP8-rounded on the NoPE dims (QAT)."""
    kv_BSC = self.kv_norm(jnp.einsum("BSD,DC->BSC", x_BSD, self.wkv[...].astype(x_BSD.dtype)))
    kv_BSC = rope.rotate(kv_BSC, table)
    return quant_kv(kv_BSC, self.cfg) if self.cfg.simulate_quant else kv_BSC

  def attend(self, q_BSHC, keys_BTC, indices_BSK):
    """One softmax (with the per-head sink) over the keys each query picked: (out [B, S, H, C], lse)."""
    cfg = self.cfg
    kernel = lambda q, kv, sink, idx: pallas_kernels.sparse_attention(q, kv, sink, idx, scale=cfg.head_dim ** -0.5,
                                                                      implementation=cfg.attention_impl)
    return kernel_sharding.per_shard("sparse_attention", kernel, (q_BSHC, keys_BTC, self.attn_sink[...], indices_BSK),
                                     ("BSHD", "BTD", "H", "BSK"), ("BSHD", "BSH"),
                                     implementation=cfg.attention_impl, split_heads=True, heads=q_BSHC.shape[2])

  def output(self, o_BSHC, table):
    """Inverse RoPE at the query position, then the grouped low-rank output projection: [B, S, D]."""
    B, S = o_BSHC.shape[:2]
    dt = o_BSHC.dtype
    o_BSHC = checkpoint_name(rope.rotate(o_BSHC, table, inverse=True), "attn_out")
    o_BSGI = o_BSHC.reshape(B, S, self.cfg.o_groups, -1)
    z_BSGR = jnp.einsum("BSGI,GIR->BSGR", o_BSGI, self.wo_a[...].astype(dt))
    return jnp.einsum("BSGR,GRD->BSD", z_BSGR, self.wo_b[...].astype(dt))

  def pick_entries(self, x_BSD, qr_BSQ, ctx, n_entries: int, offset: int):
    """Compressed entries each query attends (+offset, -1 = none) and, where the indexer chose them, their
    index scores (else None). HCA and the dense stage take every visible entry."""
    layout = ctx.layouts[self.ratio]
    if self.indexer is None or (ctx.opts.attention == "dense" and not ctx.opts.indexer_loss):
      return layout.visible_indices_BSN(ctx.segment_BS, offset=offset), None
    topk = n_entries if ctx.opts.attention == "dense" else None
    return self.indexer.select(x_BSD, qr_BSQ, ctx, offset, topk=topk)


def indexer_kl(q_BSHC, entries_BNC, lse_BSH, picked_BSK, scores_BSK, scale: float):
  """Mean over queries of KL(p ‖ softmax(index scores)) on the picked entries (-1 = none).

  p = the main attention's probability mass on each picked compressed entry, summed over heads and
  L1-normalised (the V3.2 indexer target); it is a constant here, so the KL trains only the indexer.
  """
  q_BSHC, entries_BNC, lse_BSH = (jax.lax.stop_gradient(a) for a in (q_BSHC, entries_BNC, lse_BSH))
  valid_BSK = picked_BSK >= 0
  logits_BSHN = jnp.einsum("BSHC,BNC->BSHN", q_BSHC, entries_BNC, preferred_element_type=jnp.float32,
                           precision="highest") * scale
  safe_BSK = jnp.where(valid_BSK, picked_BSK, 0)
  logits_BSHK = jnp.take_along_axis(logits_BSHN, safe_BSK[:, :, None, :], axis=-1)
  p_BSHK = jnp.where(valid_BSK[:, :, None, :], jnp.exp(logits_BSHK - lse_BSH[..., None]), 0.0)
  mass_BSK = jnp.sum(p_BSHK, axis=2)
  target_BSK = mass_BSK / jnp.maximum(jnp.sum(mass_BSK, axis=-1, keepdims=True), 1e-30)
  logq_BSK = jax.nn.log_softmax(jnp.where(valid_BSK, scores_BSK, -jnp.inf), axis=-1)
  terms_BSK = jnp.where(valid_BSK & (target_BSK > 0),
                        target_BSK * (jnp.log(jnp.maximum(target_BSK, 1e-30)) - logq_BSK), 0.0)
  has_BS = jnp.any(valid_BSK, axis=-1)
  return jnp.sum(jnp.where(has_BS, jnp.sum(terms_BSK, axis=-1), 0.0)) / jnp.maximum(jnp.sum(has_BS), 1)
