"""Parameter and KV-cache accounting from a ModelConfig alone (no arrays), spec §8.3 and §17.

Parameter counts follow the module shapes of the official `inference/model.py` (one count per stored
element, whatever its dtype; FP8/FP4 block scales are not counted). KV bytes follow the mixed FP8 storage
of spec §8.1: a 584-byte entry per window token or compressed entry, plus a 68-byte FP4 indexer key per CSA
compressed entry.
"""

from __future__ import annotations

import dataclasses

from dsv4_jax.config import ModelConfig

# DeepSeek-V3.2 at 1 token: 61 layers x (656 B MLA latent in FP8 + 132 B FP8 indexer key), spec §8.1.
V32_BYTES_PER_TOKEN = 61 * (656 + 132)
KV_FORMATS = ("fp8", "bf16", "float32")  # as dsv4_jax.model.kv_format (float32: lossless, debugging)


@dataclasses.dataclass(frozen=True)
class LayerParams:
  """Parameters of one block (main layer or the MTP layer's Block part), by component."""

  kind: str  # "swa" | "csa" | "hca"
  attention: int  # wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink
  compressor: int  # attn.compressor (CSA / HCA): wkv, wgate, ape, norm
  indexer: int  # attn.indexer (CSA): wq_b, weights_proj and its own compressor
  router: int  # ffn.gate.weight [+ ffn.gate.bias in score-routed layers]
  routed_experts: int  # all routed experts (w1, w2, w3)
  shared_experts: int
  mhc: int  # hc_{attn,ffn}_{fn,base,scale}
  norms: int  # attn_norm, ffn_norm
  active_routed: int  # the num_experts_per_tok experts a token uses
  hash_table: int  # ffn.gate.tid2eid entries (int32, not trainable; not in `total`)

  @property
  def total(self) -> int:
    return (self.attention + self.compressor + self.indexer + self.router + self.routed_experts
            + self.shared_experts + self.mhc + self.norms)

  @property
  def active(self) -> int:
    return self.total - self.routed_experts + self.active_routed


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Whole-model counts.

  total:  main model = embed + head + layers + final norm + hc head; excludes MTP and tid2eid tables.
  active: per token, excluding the input embedding (a lookup), including the head and the
          num_experts_per_tok routed + shared experts of every layer.
  mtp:    MTP module(s) excluding the embedding and head they share with the main model.
  """

  embed: int
  head: int
  final: int  # norm + hc_head_{fn,base,scale}
  layers: tuple[LayerParams, ...]
  mtp_layers: tuple[LayerParams, ...]
  mtp_extra: int  # per MTP module: e_proj, h_proj, enorm, hnorm, norm, hc_head
  hash_table: int  # all tid2eid entries

  @property
  def total(self) -> int:
    return self.embed + self.head + self.final + sum(layer.total for layer in self.layers)

  @property
  def active(self) -> int:
    return self.head + self.final + sum(layer.active for layer in self.layers)

  @property
  def mtp(self) -> int:
    return sum(layer.total for layer in self.mtp_layers) + len(self.mtp_layers) * self.mtp_extra

  @property
  def mtp_active(self) -> int:
    return sum(layer.active for layer in self.mtp_layers) + len(self.mtp_layers) * self.mtp_extra

  def by_component(self) -> dict[str, int]:
    """Main-model totals per component (sums to `total`)."""
    keys = ("attention", "compressor", "indexer", "router", "routed_experts", "shared_experts", "mhc", "norms")
    out = {"embed": self.embed, "head": self.head, "final": self.final}
    out.update({k: sum(getattr(layer, k) for layer in self.layers) for k in keys})
    return out


def _compressor(cfg: ModelConfig, ratio: int, head_dim: int) -> int:
  """wkv, wgate [d -> coff*hd], ape [ratio, coff*hd], norm [hd]; coff = 2 with the CSA overlap."""
  coff = 2 if ratio == 4 else 1
  return 2 * cfg.hidden_size * coff * head_dim + ratio * coff * head_dim + head_dim


def layer_params(cfg: ModelConfig, layer: int) -> LayerParams:
  """Block `layer` (0 .. num_hidden_layers + num_nextn_predict_layers - 1); MTP layers are never hash-routed."""
  d, c, n_h, d_c = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.q_lora_rank
  g, d_g, e, inter = cfg.o_groups, cfg.o_lora_rank, cfg.n_routed_experts, cfg.moe_intermediate_size
  ratio = cfg.compress_ratios[layer]
  attention = d * d_c + d_c + d_c * n_h * c + d * c + c + (n_h * c // g) * (g * d_g) + g * d_g * d + n_h
  compressor = _compressor(cfg, ratio, c) if ratio else 0
  indexer = 0
  if ratio == 4:
    n_i, c_i = cfg.index_n_heads, cfg.index_head_dim
    indexer = d_c * n_i * c_i + d * n_i + _compressor(cfg, ratio, c_i)
  is_hash = layer < cfg.num_hash_layers  # main layers only: num_hash_layers <= num_hidden_layers
  expert = 3 * d * inter
  mix = (2 + cfg.hc_mult) * cfg.hc_mult
  return LayerParams(
    kind=cfg.layer_kind(layer), attention=attention, compressor=compressor, indexer=indexer,
    router=d * e + (0 if is_hash else e), routed_experts=e * expert, shared_experts=cfg.n_shared_experts * expert,
    mhc=2 * (mix * cfg.hc_mult * d + mix + 3), norms=2 * d, active_routed=cfg.num_experts_per_tok * expert,
    hash_table=cfg.vocab_size * cfg.num_experts_per_tok if is_hash else 0,
  )


def count_params(cfg: ModelConfig) -> ParamCount:
  """Parameter counts of the whole model (see ParamCount for what each total includes)."""
  d, hc = cfg.hidden_size, cfg.hc_mult
  hc_head = hc * hc * d + hc + 1
  n_main = cfg.num_hidden_layers
  layers = tuple(layer_params(cfg, i) for i in range(n_main))
  mtp_layers = tuple(layer_params(cfg, n_main + i) for i in range(cfg.num_nextn_predict_layers))
  return ParamCount(
    embed=cfg.vocab_size * d, head=cfg.vocab_size * d, final=d + hc_head, layers=layers, mtp_layers=mtp_layers,
    mtp_extra=2 * d * d + 3 * d + hc_head, hash_table=sum(layer.hash_table for layer in layers),
  )


# ----- KV cache ------------------------------------------------------------------------------------------
def kv_entry_bytes(cfg: ModelConfig, fmt: str = "fp8") -> int:
  """Bytes of one K=V attention entry: FP8 NoPE + BF16 RoPE + one ue8m0 scale per 64 + 1 pad (= 584), or the
  plain vector in BF16 / float32."""
  if fmt in ("bf16", "float32"):
    return (2 if fmt == "bf16" else 4) * cfg.head_dim
  nope, rope = cfg.nope_head_dim, cfg.qk_rope_head_dim
  return nope + 2 * rope + nope // 64 + 1


def indexer_key_bytes(cfg: ModelConfig, fmt: str = "fp8") -> int:
  """Bytes of one compressed indexer key: MXFP4 (2 values a byte + a scale per 32, = 68), or BF16 / float32."""
  c_i = cfg.index_head_dim
  if fmt in ("bf16", "float32"):
    return (2 if fmt == "bf16" else 4) * c_i
  return c_i // 2 + c_i // 32


@dataclasses.dataclass(frozen=True)
class KVCache:
  """KV-cache bytes of one sequence at `context` tokens.

  window:     min(context, sliding_window) raw entries in every layer (the state cache's SWA segment);
  compressed: floor(context / m) entries in every CSA (m = 4) and HCA (m = 128) layer;
  indexer:    one indexer key per CSA compressed entry.
  total = window + compressed + indexer. Not included: the compressor tails (`compressor_state`, fp32
  buffers of fixed size per sequence, reported apart) and paging slack.
  """

  context: int
  format: str
  layers: int
  entry_bytes: int
  indexer_key_bytes: int
  window: int
  compressed: int
  indexer: int
  compressor_state: int

  @property
  def total(self) -> int:
    return self.window + self.compressed + self.indexer

  @property
  def per_token(self) -> float:
    """Amortised bytes per token of context."""
    return self.total / self.context

  @property
  def v32_total(self) -> int:
    return V32_BYTES_PER_TOKEN * self.context

  @property
  def ratio_vs_v32(self) -> float:
    return self.total / self.v32_total


def kv_cache(cfg: ModelConfig, context: int, fmt: str = "fp8", include_mtp: bool = False) -> KVCache:
  """KV-cache bytes at `context` tokens (main layers; the MTP layer's cache only with include_mtp)."""
  if fmt not in KV_FORMATS:
    raise ValueError(f"fmt = {fmt!r} must be one of {', '.join(KV_FORMATS)}")
  if context < 1:
    raise ValueError(f"context = {context} must be >= 1")
  ratios = cfg.compress_ratios if include_mtp else cfg.main_ratios
  entry, key = kv_entry_bytes(cfg, fmt), indexer_key_bytes(cfg, fmt)
  n_comp = [context // r if r else 0 for r in ratios]
  state = 0
  for r in ratios:  # kv_state + score_state [coff*m, coff*hd] fp32, main and indexer compressors
    coff = 2 if r == 4 else 1
    state += 2 * 4 * coff * r * coff * cfg.head_dim if r else 0
    state += 2 * 4 * coff * r * coff * cfg.index_head_dim if r == 4 else 0
  return KVCache(
    context=context, format=fmt, layers=len(ratios), entry_bytes=entry, indexer_key_bytes=key,
    window=len(ratios) * min(context, cfg.sliding_window) * entry, compressed=sum(n_comp) * entry,
    indexer=sum(n for n, r in zip(n_comp, ratios) if r == 4) * key, compressor_state=state,
  )


# ----- training FLOPs ------------------------------------------------------------------------------------
def train_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
  """Model FLOPs of one training token (forward + backward = 3 × forward), counting only work done.

  Matmuls: 2 · active parameters (the routed experts a token uses, the shared expert, the head; MTP when
  trained). Attention: 4 · heads · head_dim per attended key (q·k and p·v), with the keys a query really
  attends on average over a sequence of `seq_len`: the window, plus the top-k (CSA) or every visible (HCA)
  compressed entry. The indexer: 2 · index heads · index dim per visible CSA entry. mHC mixing and norms are
  omitted (elementwise).
  """
  counts = count_params(cfg)
  matmul = counts.active + (counts.mtp_active + counts.head if with_mtp else 0)
  ratios = list(cfg.main_ratios) + (list(cfg.mtp_ratios) if with_mtp else [])
  avg_window = min(cfg.sliding_window, (seq_len + 1) / 2)
  attn = 0.0
  for ratio in ratios:
    keys = avg_window
    if ratio:
      visible = (seq_len / ratio) / 2  # mean over queries of floor((t+1)/m)
      if ratio == 4:  # mean over t of min(k, t/m)
        k, full = cfg.index_topk, seq_len / ratio
        keys += visible if full <= k else k - k * k / (2 * full)
      else:
        keys += visible
      if ratio == 4:
        attn += 2 * cfg.index_n_heads * cfg.index_head_dim * visible
    attn += 4 * cfg.num_attention_heads * cfg.head_dim * keys
  return 3.0 * (2.0 * matmul + attn)
