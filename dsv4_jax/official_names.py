"""The official checkpoint's tensors (spec §20) and how each maps onto our parameter tree.

Official linear weights are [out, in]; ours are [in, out] with heads / groups / experts split into their own
axes, and the layers of a scanned run stacked on a leading axis. `official_tensors(model)` lists every tensor
of the release for a model's config (name, official shape, our variable path, index into its stacked axes, and
the layout transform); `to_ours` / `to_official` convert one array. Quantized storage (FP8 `.scale` blocks,
FP4 expert nibbles) is handled by the loader before these transforms.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str  # official tensor name, e.g. "layers.3.attn.wq_b.weight"
  shape: tuple[int, ...]  # official (dequantized) shape
  path: tuple  # our variable's path in nnx.state(model)
  index: tuple[int, ...]  # leading indices into our (stacked) variable, e.g. (repeat,) or (repeat, expert)
  layout: tuple  # ("same",) | ("T",) | ("heads", h, c) | ("wo_a", g, r) | ("wo_b", g, r) | ("int32",)
  fp8_in_release: bool = False  # stored as FP8 e4m3 + 128x128 ue8m0 `.scale` in the official release
  expert: bool = False  # a routed-expert matrix (FP4 in post-trained releases, FP8 in Base)


def to_ours(x: np.ndarray, layout: tuple) -> np.ndarray:
  kind = layout[0]
  if kind == "same":
    return x
  if kind == "T":
    return x.T
  if kind == "heads":  # [h*c, q] -> [q, h, c]
    _, h, c = layout
    return x.T.reshape(x.shape[1], h, c)
  if kind == "wo_a":  # [g*r, i] -> [g, i, r]
    _, g, r = layout
    return x.reshape(g, r, x.shape[1]).transpose(0, 2, 1)
  if kind == "wo_b":  # [d, g*r] -> [g, r, d]
    _, g, r = layout
    return x.T.reshape(g, r, x.shape[0])
  if kind == "int32":
    return x.astype(np.int32)
  raise ValueError(f"unknown layout {layout}")


def to_official(x: np.ndarray, layout: tuple) -> np.ndarray:
  kind = layout[0]
  if kind == "same":
    return x
  if kind == "T":
    return x.T
  if kind == "heads":  # [q, h, c] -> [h*c, q]
    return x.reshape(x.shape[0], -1).T
  if kind == "wo_a":  # [g, i, r] -> [g*r, i]
    g, i, r = x.shape
    return x.transpose(0, 2, 1).reshape(g * r, i)
  if kind == "wo_b":  # [g, r, d] -> [d, g*r]
    g, r, d = x.shape
    return x.reshape(g * r, d).T
  if kind == "int32":
    return x.astype(np.int64)  # the release stores tid2eid as int64
  raise ValueError(f"unknown layout {layout}")


def _block_tensors(cfg, prefix: str, path: tuple, index: tuple, ratio: int, hash_routed: bool):
  d, h, c, g, r = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
  q, f, E = cfg.q_lora_rank, cfg.moe_intermediate_size, cfg.n_routed_experts
  out = []

  def add(name, shape, sub, layout=("same",), fp8=False, expert_index=None):
    idx = index if expert_index is None else index + (expert_index,)
    out.append(TensorSpec(prefix + name, tuple(shape), path + sub, idx, layout, fp8, expert_index is not None))

  mix, n = (2 + cfg.hc_mult) * cfg.hc_mult, cfg.hc_mult
  for hc, ours in (("attn", "attn_hc"), ("ffn", "ffn_hc")):
    add(f"hc_{hc}_fn", (mix, n * d), (ours, "fn"))
    add(f"hc_{hc}_base", (mix,), (ours, "base"))
    add(f"hc_{hc}_scale", (3,), (ours, "scale"))
  add("attn_norm.weight", (d,), ("attn_norm", "weight"))
  add("ffn_norm.weight", (d,), ("ffn_norm", "weight"))
  a = ("attn",)
  add("attn.wq_a.weight", (q, d), a + ("wq_a",), ("T",), fp8=True)
  add("attn.q_norm.weight", (q,), a + ("q_norm", "weight"))
  add("attn.wq_b.weight", (h * c, q), a + ("wq_b",), ("heads", h, c), fp8=True)
  add("attn.wkv.weight", (c, d), a + ("wkv",), ("T",), fp8=True)
  add("attn.kv_norm.weight", (c,), a + ("kv_norm", "weight"))
  add("attn.wo_a.weight", (g * r, h * c // g), a + ("wo_a",), ("wo_a", g, r), fp8=True)
  add("attn.wo_b.weight", (d, g * r), a + ("wo_b",), ("wo_b", g, r), fp8=True)
  add("attn.attn_sink", (h,), a + ("attn_sink",))

  def compressor(pre, sub, ratio, width):
    coff = 2 if ratio == 4 else 1
    add(pre + "wkv.weight", (coff * width, d), sub + ("wkv",), ("T",))
    add(pre + "wgate.weight", (coff * width, d), sub + ("wgate",), ("T",))
    add(pre + "ape", (ratio, coff * width), sub + ("ape",))
    add(pre + "norm.weight", (width,), sub + ("norm", "weight"))

  if ratio:
    compressor("attn.compressor.", a + ("compressor",), ratio, c)
  if ratio == 4:
    hi, ci = cfg.index_n_heads, cfg.index_head_dim
    add("attn.indexer.wq_b.weight", (hi * ci, q), a + ("indexer", "wq_b"), ("heads", hi, ci), fp8=True)
    add("attn.indexer.weights_proj.weight", (hi, d), a + ("indexer", "weights_proj"), ("T",))
    compressor("attn.indexer.compressor.", a + ("indexer", "compressor"), 4, ci)

  m = ("ffn",)
  add("ffn.gate.weight", (E, d), m + ("router", "weight"), ("T",))
  if hash_routed:
    add("ffn.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), m + ("router", "tid2eid"), ("int32",))
  else:
    add("ffn.gate.bias", (E,), m + ("router", "bias"))
  for e in range(E):
    add(f"ffn.experts.{e}.w1.weight", (f, d), m + ("experts", "w1"), ("T",), expert_index=e)
    add(f"ffn.experts.{e}.w2.weight", (d, f), m + ("experts", "w2"), ("T",), expert_index=e)
    add(f"ffn.experts.{e}.w3.weight", (f, d), m + ("experts", "w3"), ("T",), expert_index=e)
  if cfg.n_shared_experts:
    add("ffn.shared_experts.w1.weight", (f, d), m + ("shared", "w1"), ("T",), fp8=True)
    add("ffn.shared_experts.w2.weight", (d, f), m + ("shared", "w2"), ("T",), fp8=True)
    add("ffn.shared_experts.w3.weight", (f, d), m + ("shared", "w3"), ("T",), fp8=True)
  return out


def official_tensors(model) -> list[TensorSpec]:
  """Every tensor of the official release for `model`'s config, in checkpoint order."""
  cfg = model.cfg
  d, V, n = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
  specs = [TensorSpec("embed.weight", (V, d), ("embed",), (), ("same",))]
  for layer in range(cfg.num_hidden_layers):
    s, rep, pos = model.layer_location(layer)
    path = ("stacks", s, "units", "blocks", pos)
    specs += _block_tensors(cfg, f"layers.{layer}.", path, (rep,), cfg.compress_ratios[layer],
                            layer < cfg.num_hash_layers)
  specs += [
      TensorSpec("norm.weight", (d,), ("norm", "weight"), (), ("same",)),
      TensorSpec("head.weight", (V, d), ("head",), (), ("T",)),
      TensorSpec("hc_head_fn", (n, n * d), ("hc_head", "fn"), (), ("same",)),
      TensorSpec("hc_head_base", (n,), ("hc_head", "base"), (), ("same",)),
      TensorSpec("hc_head_scale", (1,), ("hc_head", "scale"), (), ("same",)),
  ]
  for k, ratio in enumerate(cfg.mtp_ratios[:1]):
    pre, path = f"mtp.{k}.", ("mtp", k)
    specs += _block_tensors(cfg, pre, path + ("block",), (), ratio, False)
    specs += [
        TensorSpec(pre + "e_proj.weight", (d, d), path + ("e_proj",), (), ("T",), True),
        TensorSpec(pre + "h_proj.weight", (d, d), path + ("h_proj",), (), ("T",), True),
        TensorSpec(pre + "enorm.weight", (d,), path + ("enorm", "weight"), (), ("same",)),
        TensorSpec(pre + "hnorm.weight", (d,), path + ("hnorm", "weight"), (), ("same",)),
        TensorSpec(pre + "norm.weight", (d,), path + ("norm", "weight"), (), ("same",)),
        TensorSpec(pre + "hc_head_fn", (n, n * d), path + ("hc_head", "fn"), (), ("same",)),
        TensorSpec(pre + "hc_head_base", (n,), path + ("hc_head", "base"), (), ("same",)),
        TensorSpec(pre + "hc_head_scale", (1,), path + ("hc_head", "scale"), (), ("same",)),
    ]
  return specs
