"""Tests for dsv4_jax.accounting: spec §17 parameter counts and §8.3 KV-cache sizes."""

from __future__ import annotations

import math

import pytest

from dsv4_jax import accounting
from dsv4_jax.accounting import (
  V32_BYTES_PER_TOKEN,
  count_params,
  indexer_key_bytes,
  kv_cache,
  kv_entry_bytes,
)
from dsv4_jax.config import PRESETS, ModelConfig

GiB = 2**30
MILLION = 1048576


# ----- parameters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,total,active,mtp", [
  ("flash", 284.3, 13.27, 6.6),
  ("pro", 1573.0, 48.85, 25.8),
  ("flash-base", 284.3, 13.27, 6.6),
  ("pro-base", 1573.0, 48.85, 25.8),
])
def test_params_match_spec(name, total, active, mtp):
  p = count_params(ModelConfig.preset(name))
  assert round(p.total / 1e9, 1) == total
  assert round(p.active / 1e9, 2) == active
  assert round(p.mtp / 1e9, 1) == mtp


def test_params_match_headline():
  """REPORT: Flash 284B / 13B activated, Pro 1.6T (with MTP) / 49B activated."""
  flash, pro = count_params(ModelConfig.preset("flash")), count_params(ModelConfig.preset("pro"))
  assert round(flash.total / 1e9) == 284 and round(flash.active / 1e9) == 13
  assert round((pro.total + pro.mtp) / 1e12, 1) == 1.6 and round(pro.active / 1e9) == 49


def official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Trainable tensors of the official inference/model.py by checkpoint name (no scales, no tid2eid)."""
  d, c, n_h, d_c, g, d_g = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.q_lora_rank, cfg.o_groups,
                            cfg.o_lora_rank)
  e, inter, hc, v = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hc_mult, cfg.vocab_size
  mix = (2 + hc) * hc
  shapes = {"embed.weight": (v, d), "head.weight": (v, d), "norm.weight": (d,), "hc_head_fn": (hc, hc * d),
            "hc_head_base": (hc,), "hc_head_scale": (1,)}

  def compressor(p, ratio, hd):
    coff = 2 if ratio == 4 else 1
    return {f"{p}.wkv.weight": (coff * hd, d), f"{p}.wgate.weight": (coff * hd, d), f"{p}.ape": (ratio, coff * hd),
            f"{p}.norm.weight": (hd,)}

  for i, ratio in enumerate(cfg.compress_ratios):
    p = f"layers.{i}" if i < cfg.num_hidden_layers else f"mtp.{i - cfg.num_hidden_layers}"
    a = f"{p}.attn"
    shapes.update({f"{a}.wq_a.weight": (d_c, d), f"{a}.q_norm.weight": (d_c,), f"{a}.wq_b.weight": (n_h * c, d_c),
                   f"{a}.wkv.weight": (c, d), f"{a}.kv_norm.weight": (c,), f"{a}.wo_a.weight": (g * d_g, n_h * c // g),
                   f"{a}.wo_b.weight": (d, g * d_g), f"{a}.attn_sink": (n_h,)})
    if ratio:
      shapes.update(compressor(f"{a}.compressor", ratio, c))
    if ratio == 4:
      n_i, c_i = cfg.index_n_heads, cfg.index_head_dim
      shapes.update({f"{a}.indexer.wq_b.weight": (n_i * c_i, d_c), f"{a}.indexer.weights_proj.weight": (n_i, d)})
      shapes.update(compressor(f"{a}.indexer.compressor", ratio, c_i))
    shapes[f"{p}.ffn.gate.weight"] = (e, d)
    if not (i < cfg.num_hash_layers):
      shapes[f"{p}.ffn.gate.bias"] = (e,)
    for j in [*range(e), "shared"]:
      x = f"{p}.ffn.experts.{j}" if j != "shared" else f"{p}.ffn.shared_experts"
      shapes.update({f"{x}.w1.weight": (inter, d), f"{x}.w2.weight": (d, inter), f"{x}.w3.weight": (inter, d)})
    for s in ("attn", "ffn"):
      shapes.update({f"{p}.hc_{s}_fn": (mix, hc * d), f"{p}.hc_{s}_base": (mix,), f"{p}.hc_{s}_scale": (3,)})
    shapes.update({f"{p}.attn_norm.weight": (d,), f"{p}.ffn_norm.weight": (d,)})
    if p.startswith("mtp"):
      shapes.update({f"{p}.e_proj.weight": (d, d), f"{p}.h_proj.weight": (d, d), f"{p}.enorm.weight": (d,),
                     f"{p}.hnorm.weight": (d,), f"{p}.norm.weight": (d,), f"{p}.hc_head_fn": (hc, hc * d),
                     f"{p}.hc_head_base": (hc,), f"{p}.hc_head_scale": (1,)})
  return shapes


@pytest.mark.parametrize("name", ["tiny", "tiny-pro", "small"])
def test_counts_equal_sum_of_official_tensor_shapes(name):
  cfg = ModelConfig.preset(name)
  shapes = official_shapes(cfg)
  main = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("mtp."))
  mtp = sum(math.prod(s) for k, s in shapes.items() if k.startswith("mtp."))
  p = count_params(cfg)
  assert p.total == main and p.mtp == mtp
  experts = sum(math.prod(s) for k, s in shapes.items() if ".ffn.experts." in k and not k.startswith("mtp."))
  per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
  routed_active = cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
  assert p.active == main - shapes["embed.weight"][0] * cfg.hidden_size - experts + routed_active


def test_components_sum_to_total_and_follow_layer_kinds():
  cfg = ModelConfig.preset("flash")
  p = count_params(cfg)
  assert sum(p.by_component().values()) == p.total
  for i, layer in enumerate(p.layers):
    kind = cfg.layer_kind(i)
    assert layer.kind == kind
    assert (layer.compressor > 0) == (kind != "swa") and (layer.indexer > 0) == (kind == "csa")
    assert (layer.hash_table > 0) == (i < 3)
  assert p.hash_table == 3 * 129280 * 6
  assert p.mtp_layers[0].hash_table == 0 and p.mtp_layers[0].kind == "swa"


@pytest.mark.parametrize("name", list(PRESETS))
def test_active_below_total(name):
  p = count_params(ModelConfig.preset(name))
  assert 0 < p.active < p.total and 0 < p.mtp_active <= p.mtp


# ----- KV cache ------------------------------------------------------------------------------------------
def test_entry_sizes():
  cfg = ModelConfig.preset("pro")
  assert kv_entry_bytes(cfg) == 584 == 448 + 64 * 2 + 448 // 64 + 1
  assert indexer_key_bytes(cfg) == 68
  assert kv_entry_bytes(cfg, "bf16") == 1024 and indexer_key_bytes(cfg, "bf16") == 256
  assert V32_BYTES_PER_TOKEN == 61 * 788


@pytest.mark.parametrize("name,ratio,gib,per_token_kb", [("flash", 7.3, 3.43, 3.5), ("pro", 10.5, 4.92, 5.0)])
def test_kv_at_1m_matches_spec(name, ratio, gib, per_token_kb):
  kv = kv_cache(ModelConfig.preset(name), MILLION)
  assert round(100 * kv.ratio_vs_v32, 1) == ratio
  assert round(kv.total / GiB, 2) == gib
  assert round(kv.per_token / 1000, 1) == per_token_kb
  assert round(kv.v32_total / GiB) == 47


def test_kv_fig1_factors():
  """Fig. 1: 9.5x (Pro) and 13.7x (Flash) smaller KV than V3.2 at 1M."""
  assert round(1 / kv_cache(ModelConfig.preset("pro"), MILLION).ratio_vs_v32, 1) == 9.5
  assert round(1 / kv_cache(ModelConfig.preset("flash"), MILLION).ratio_vs_v32, 1) == 13.7


def test_kv_pro_by_hand():
  kv = kv_cache(ModelConfig.preset("pro"), MILLION)
  assert kv.window == 61 * 128 * 584
  assert kv.compressed == (30 * MILLION // 4 + 31 * MILLION // 128) * 584
  assert kv.indexer == 30 * (MILLION // 4) * 68
  assert kv.total == kv.window + kv.compressed + kv.indexer


def test_kv_bf16_pro_is_about_twice():
  kv = kv_cache(ModelConfig.preset("pro"), MILLION, "bf16")
  assert 9 < kv.total / GiB < 10  # spec §8.3: all-BF16 storage would give ~9-10 GiB


def test_kv_short_context_and_partial_blocks():
  cfg = ModelConfig.preset("flash")
  kv = kv_cache(cfg, 130)  # 128 window entries; 32 CSA entries, 1 HCA entry per compressed layer
  assert kv.window == 43 * 128 * 584
  assert kv.compressed == (21 * 32 + 20 * 1) * 584 and kv.indexer == 21 * 32 * 68
  kv = kv_cache(cfg, 3)
  assert kv.window == 43 * 3 * 584 and kv.compressed == 0 and kv.indexer == 0


def test_kv_include_mtp_and_errors():
  cfg = ModelConfig.preset("flash")
  assert kv_cache(cfg, 1000, include_mtp=True).window == 44 * 128 * 584
  assert kv_cache(cfg, 1000).layers == 43
  with pytest.raises(ValueError, match="fmt"):
    kv_cache(cfg, 10, "fp4")
  with pytest.raises(ValueError, match="context"):
    kv_cache(cfg, 0)


# ----- V3.2 baseline and single-token inference FLOPs ----------------------------------------------------
def test_v32_params_match_headline():
  """V3 is 671B total / 37B activated; V3.2 adds the DSA indexer (wq_b, wk, weights_proj, k_norm) to each layer."""
  c = accounting.V32
  p = accounting.v32_params(c)
  indexer = c.num_hidden_layers * (c.q_lora_rank * 64 * 128 + c.hidden_size * 128 + c.hidden_size * 64 + 2 * 128)
  assert round((p.total - indexer) / 1e9, 2) == 671.03  # 671,026,419,200 main-model weights of V3
  assert round((p.active - indexer) / 1e9) == 37  # 36.6B without, 37.6B with the input embedding
  assert p.routed_experts == 58 * 256 * 3 * 7168 * 2048 and p.active_routed == 58 * 8 * 3 * 7168 * 2048


def test_v32_kv_bytes():
  assert accounting.v32_kv_bytes_per_layer() == (656, 132)
  assert accounting.kv_bytes(accounting.V32, 1000) == V32_BYTES_PER_TOKEN * 1000
  assert accounting.kv_bytes_per_token(accounting.V32, 77) == V32_BYTES_PER_TOKEN
  pro = ModelConfig.preset("pro")
  assert accounting.kv_bytes(pro, MILLION) == kv_cache(pro, MILLION).total
  assert round(accounting.kv_bytes_per_token(pro, MILLION)) == round(kv_cache(pro, MILLION).per_token)
  with pytest.raises(ValueError, match="context"):
    accounting.kv_bytes(accounting.V32, 0)


@pytest.mark.parametrize("context", [1, 64, 65, 700])
def test_attended_keys_match_the_model_index_sets(context):
  """Keys of the last query, counted from the model's own window indices and block layouts (context.py)."""
  import jax.numpy as jnp  # noqa: PLC0415

  from dsv4_jax.model.context import block_layout, window_indices  # noqa: PLC0415

  cfg = ModelConfig.preset("small")
  seg = jnp.zeros((1, context), jnp.int32)
  pos = jnp.arange(context, dtype=jnp.int32)[None]
  window = int(jnp.sum(window_indices(seg, cfg.sliding_window)[0, -1] >= 0))
  visible = {r: int(jnp.sum(block_layout(pos, seg, r).visible_indices_BSN(seg, 0)[0, -1] >= 0)) for r in (4, 128)}
  keys = sum(window + (min(cfg.index_topk, visible[r]) if r == 4 else visible[r] if r else 0)
             for r in cfg.main_ratios)
  index_keys = sum(visible[4] for r in cfg.main_ratios if r == 4)
  assert accounting.attended_keys(cfg, context) == (keys, index_keys)


def test_inference_flops_pro_by_hand():
  pro = ModelConfig.preset("pro")
  f = accounting.inference_flops_per_token(pro, MILLION)
  assert f.keys == 61 * 128 + 30 * 1024 + 31 * (MILLION // 128)
  assert f.attention == 4 * 128 * 512 * f.keys
  assert f.index_keys == 30 * MILLION // 4 and f.indexer == f.index_keys * 64 * (2 * 128 + 2)
  assert f.linear_fp8 + f.linear_bf16 == 2 * count_params(pro).active
  v = accounting.inference_flops_per_token(accounting.V32, MILLION)
  assert v.keys == 61 * 2048 and v.attention == 61 * 2048 * 2 * 128 * (512 + 64 + 512)
  assert v.index_keys == 61 * MILLION
  assert v.linear_fp8 + v.linear_bf16 == 2 * accounting.v32_params().active
  raw = f.linear_fp8 + f.linear_bf16 + f.attention + f.indexer
  assert f.total("raw") == raw
  assert f.total("fp8") == raw + f.linear_bf16 + f.attention
  assert f.total("fp8_fp4") == f.total("fp8") - f.indexer / 2
  with pytest.raises(ValueError, match="weighting"):
    f.total("fp16")


def test_inference_flops_reproduce_published_ratios():
  """REPORT/CARD at 1M: Pro 27% and Flash 10% of V3.2's single-token FLOPs, in FP8-equivalent FLOPs; our
  fp8_fp4 weighting (BF16 x2, FP4 x1/2) lands within a point, the other weightings do not."""
  v32 = accounting.inference_flops_per_token(accounting.V32, MILLION)
  ratio = lambda name, w: (accounting.inference_flops_per_token(ModelConfig.preset(name), MILLION).total(w)
                           / v32.total(w))
  assert abs(ratio("pro", "fp8_fp4") - 0.27) < 0.01 and abs(ratio("flash", "fp8_fp4") - 0.10) < 0.01
  assert abs(ratio("pro", "fp8") - 0.27) > 0.04 and abs(ratio("flash", "raw") - 0.10) > 0.015


def test_inference_flops_grow_with_context_and_errors():
  for cfg in (ModelConfig.preset("flash"), accounting.V32):
    totals = [accounting.inference_flops_per_token(cfg, c).total() for c in (1, 128, 8192, MILLION)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
  with pytest.raises(ValueError, match="context"):
    accounting.inference_flops_per_token(ModelConfig.preset("flash"), 0)
