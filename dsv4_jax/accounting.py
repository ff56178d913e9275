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


# ----- DeepSeek-V3.2, the baseline of the published ratios -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class V32Config:
  """DeepSeek-V3.2(-Exp): MLA + DSA. Values of the public `inference/config_671B_v3.2.json` (HF
  deepseek-ai/DeepSeek-V3.2-Exp); the spec gives only its KV bytes (§8.1: 656 + 132 B per token and layer)."""

  vocab_size: int = 129280
  hidden_size: int = 7168
  num_hidden_layers: int = 61
  first_k_dense: int = 3  # n_dense_layers: a dense SwiGLU FFN of intermediate_size
  intermediate_size: int = 18432
  moe_intermediate_size: int = 2048
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  num_experts_per_tok: int = 8
  num_attention_heads: int = 128
  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 2048
  fp8_scale_block: int = 128  # one float32 scale per 128 FP8 values (FlashMLA latent, indexer keys)


V32 = V32Config()


@dataclasses.dataclass(frozen=True)
class V32Params:
  """V3.2 main-model parameters (MTP excluded), split by the GEMM precision of its FP8 release."""

  embed: int
  head: int  # BF16
  fp8_layers: int  # all FP8 linear weights: MLA projections, indexer wq_b / wk, dense FFN, experts
  bf16_layers: int  # router gates, indexer weights_proj, norms
  routed_experts: int
  active_routed: int

  @property
  def total(self) -> int:
    return self.embed + self.head + self.fp8_layers + self.bf16_layers

  @property
  def active(self) -> int:
    """Per token, excluding the input embedding (as ParamCount.active)."""
    return self.total - self.embed - self.routed_experts + self.active_routed


def v32_params(c: V32Config = V32) -> V32Params:
  """Parameter counts of V3.2 from the module shapes of its `inference/model.py` (671B total, 37B active)."""
  d, n_h, n_l = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
  qk = c.qk_nope_head_dim + c.qk_rope_head_dim
  mla = (d * c.q_lora_rank + c.q_lora_rank * n_h * qk + d * (c.kv_lora_rank + c.qk_rope_head_dim)
         + c.kv_lora_rank * n_h * (c.qk_nope_head_dim + c.v_head_dim) + n_h * c.v_head_dim * d)
  indexer = c.q_lora_rank * c.index_n_heads * c.index_head_dim + d * c.index_head_dim
  expert = 3 * d * c.moe_intermediate_size
  n_moe = n_l - c.first_k_dense
  fp8 = n_l * (mla + indexer) + c.first_k_dense * 3 * d * c.intermediate_size
  fp8 += n_moe * (c.n_routed_experts + c.n_shared_experts) * expert
  norms = c.q_lora_rank + c.kv_lora_rank + 2 * c.index_head_dim + 2 * d  # q/kv norms, k_norm (LayerNorm), 2 RMS
  bf16 = n_l * (d * c.index_n_heads + norms) + n_moe * (d * c.n_routed_experts + c.n_routed_experts) + d
  return V32Params(embed=c.vocab_size * d, head=c.vocab_size * d, fp8_layers=fp8, bf16_layers=bf16,
                   routed_experts=n_moe * c.n_routed_experts * expert,
                   active_routed=n_moe * c.num_experts_per_tok * expert)


def v32_kv_bytes_per_layer(c: V32Config = V32) -> tuple[int, int]:
  """(MLA entry, indexer key) bytes per token and layer: FP8 latent + fp32 scale per 128 + BF16 rope (656),
  FP8 key + fp32 scale per 128 (132)."""
  latent = c.kv_lora_rank + 4 * (c.kv_lora_rank // c.fp8_scale_block) + 2 * c.qk_rope_head_dim
  key = c.index_head_dim + 4 * (c.index_head_dim // c.fp8_scale_block)
  return latent, key


def kv_bytes(cfg: ModelConfig | V32Config, context: int) -> int:
  """Production-format KV-cache bytes of one sequence at `context` tokens, for a V4 config (kv_cache(...).total,
  fp8 format, main layers) or V3.2 (every token in every layer)."""
  if isinstance(cfg, V32Config):
    if context < 1:
      raise ValueError(f"context = {context} must be >= 1")
    return cfg.num_hidden_layers * sum(v32_kv_bytes_per_layer(cfg)) * context
  return kv_cache(cfg, context).total


def kv_bytes_per_token(cfg: ModelConfig | V32Config, context: int) -> float:
  """Amortised KV bytes per token of context (kv_bytes / context)."""
  return kv_bytes(cfg, context) / context


# ----- single-token inference FLOPs ----------------------------------------------------------------------
# Weight of one FLOP of each GEMM precision, in "FP8-equivalent" units (REPORT: "measured in equivalent FP8
# FLOPs"). raw: every FLOP is one. fp8: a BF16 FLOP costs two FP8 FLOPs (half the tensor-core rate), FP4 at the
# FP8 rate (Hopper). fp8_fp4: as fp8, and an FP4 x FP4 FLOP (V4's indexer) costs half an FP8 FLOP (Blackwell).
FLOP_WEIGHTINGS: dict[str, dict[str, float]] = {
  "raw": {"bf16": 1.0, "fp8": 1.0, "fp4": 1.0},
  "fp8": {"bf16": 2.0, "fp8": 1.0, "fp4": 1.0},
  "fp8_fp4": {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5},
}


@dataclasses.dataclass(frozen=True)
class InferenceFlops:
  """FLOPs to decode one token with `context` tokens in the cache (itself included), by part and precision.

  linear_fp8:  2 · active parameters of the FP8 GEMMs (attention projections, experts: V4's FP4 experts run as
               FP8 after their lossless FP4 -> FP8 dequantisation, spec §9).
  linear_bf16: 2 · active parameters kept in higher precision: the head, router gates, mHC mixes, compressor and
               indexer-weight projections (counted as BF16).
  attention:   core attention over the keys the query really attends, BF16: per head and key q·k and p·v.
  indexer:     the indexer's q·k over every visible key (V3.2: every token, FP8; V4 CSA: every compressed
               entry, FP4) plus its ReLU-weighted head sum.
  keys:        attended keys per token summed over layers; index_keys likewise for the indexer.
  Not counted: norms, softmax, RoPE, top-k selection, mHC Sinkhorn and compressor pooling (elementwise), the
  input embedding (a lookup) and MTP.
  """

  model: str
  context: int
  linear_fp8: float
  linear_bf16: float
  attention: float
  indexer: float
  indexer_precision: str  # "fp8" (V3.2) | "fp4" (V4)
  keys: int
  index_keys: int

  def total(self, weighting: str = "fp8_fp4") -> float:
    """Weighted sum of the parts (FLOP_WEIGHTINGS)."""
    if weighting not in FLOP_WEIGHTINGS:
      raise ValueError(f"weighting = {weighting!r} must be one of {', '.join(FLOP_WEIGHTINGS)}")
    w = FLOP_WEIGHTINGS[weighting]
    return (w["fp8"] * self.linear_fp8 + w["bf16"] * (self.linear_bf16 + self.attention)
            + w[self.indexer_precision] * self.indexer)


def attended_keys(cfg: ModelConfig | V32Config, context: int) -> tuple[int, int]:
  """(attention keys, indexer keys) of the token at `context`, summed over the main layers.

  V4: min(context, window) raw entries, plus min(top-k, floor(context/4)) CSA or floor(context/128) HCA
  compressed entries; the indexer scores all floor(context/4) CSA entries. V3.2: min(context, 2048) tokens; its
  indexer scores all `context` tokens."""
  if context < 1:
    raise ValueError(f"context = {context} must be >= 1")
  if isinstance(cfg, V32Config):
    return cfg.num_hidden_layers * min(context, cfg.index_topk), cfg.num_hidden_layers * context
  keys = index_keys = 0
  for ratio in cfg.main_ratios:
    keys += min(context, cfg.sliding_window)
    if ratio == 4:
      keys += min(cfg.index_topk, context // 4)
      index_keys += context // 4
    elif ratio:
      keys += context // ratio
  return keys, index_keys


def inference_flops_per_token(cfg: ModelConfig | V32Config, context: int) -> InferenceFlops:
  """Single-token decode FLOPs at `context` for a V4 config or V3.2 (see InferenceFlops for the rules)."""
  keys, index_keys = attended_keys(cfg, context)
  if isinstance(cfg, V32Config):
    p = v32_params(cfg)
    fp8 = p.fp8_layers - p.routed_experts + p.active_routed
    # Decode runs MLA absorbed (MQA over the 512 latent + 64 rope dims): q·k over 576, p·v over 512.
    per_key = 2 * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return InferenceFlops(
      model="V3.2", context=context, linear_fp8=2.0 * fp8, linear_bf16=2.0 * (p.head + p.bf16_layers),
      attention=float(per_key * keys), indexer=float(index_keys * cfg.index_n_heads * (2 * cfg.index_head_dim + 2)),
      indexer_precision="fp8", keys=keys, index_keys=index_keys)
  counts = count_params(cfg)
  fp8 = bf16 = 0
  for layer in counts.layers:
    wq_b_index = cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim if layer.indexer else 0
    fp8 += layer.attention + wq_b_index + layer.active_routed + layer.shared_experts
    bf16 += layer.compressor + layer.indexer - wq_b_index + layer.router + layer.mhc + layer.norms
  bf16 += counts.head + counts.final
  per_key = 4 * cfg.num_attention_heads * cfg.head_dim
  return InferenceFlops(
    model=f"V4 ({cfg.num_hidden_layers} layers, d {cfg.hidden_size})", context=context, linear_fp8=2.0 * fp8,
    linear_bf16=2.0 * bf16, attention=float(per_key * keys),
    indexer=float(index_keys * cfg.index_n_heads * (2 * cfg.index_head_dim + 2)), indexer_precision="fp4",
    keys=keys, index_keys=index_keys)
