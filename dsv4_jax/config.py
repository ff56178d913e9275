"""ModelConfig: every DeepSeek-V4 hyper-parameter (spec §1), validated on construction.

Field names follow the official Hugging Face `config.json` where one exists, so `from_hf` / `to_hf` are
mostly renames. Fields that are not in `config.json` (dtypes, `simulate_quant`, kernel choice) come last.

  cfg = ModelConfig.preset("flash")          # "flash", "pro", "flash-base", "pro-base", "tiny", "tiny-pro", "small"
  cfg = ModelConfig.from_hf("ckpt_dir")      # official config.json (or inference/config.json names)
  cfg.to_hf()                                # official config.json dict back
  cfg.to_dict() / ModelConfig.from_dict(d)   # our own field names
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import warnings
from typing import Any, Literal

LayerKind = Literal["swa", "csa", "hca"]
RATIO_TO_KIND: dict[int, LayerKind] = {0: "swa", 4: "csa", 128: "hca"}

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("reference", "tpu", "gpu", "auto")
MOE_IMPLS = ("auto", "ragged", "capacity", "alltoall", "exact")
EXPERT_DTYPES = (None, "fp4", "fp8")
WEIGHT_QUANTS = (None, "fp8")
# The official FP8 format of the non-expert weights (config.json `quantization_config`).
OFFICIAL_QUANTIZATION_CONFIG = {
  "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
  "weight_block_size": [128, 128],
}
# Our fields that config.json does not carry; to_hf stores non-default ones under this key.
RUNTIME_KEY = "dsv4_jax"
RUNTIME_FIELDS = ("simulate_quant", "dtype", "param_dtype", "attention_impl", "scan_layers", "moe_impl",
                  "moe_capacity_factor", "fp32_matmuls")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Sizes.
  vocab_size: int = 129280
  hidden_size: int = 4096
  num_hidden_layers: int = 43
  num_nextn_predict_layers: int = 1
  # Attention (shared-KV MQA).
  num_attention_heads: int = 64
  head_dim: int = 512
  qk_rope_head_dim: int = 64
  q_lora_rank: int = 1024
  o_groups: int = 8
  o_lora_rank: int = 1024
  sliding_window: int = 128
  compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
  # Lightning indexer (CSA layers).
  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 512
  # MoE.
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  num_experts_per_tok: int = 6
  moe_intermediate_size: int = 2048
  num_hash_layers: int = 3
  routed_scaling_factor: float = 1.5
  scoring_func: str = "sqrtsoftplus"
  norm_topk_prob: bool = True
  swiglu_limit: float = 10.0  # 0 disables the clamp (as the official Expert's default)
  # mHC.
  hc_mult: int = 4
  hc_sinkhorn_iters: int = 20
  hc_eps: float = 1e-6
  rms_norm_eps: float = 1e-6
  # RoPE: plain theta in SWA-only layers, YaRN-scaled compress theta in CSA/HCA layers.
  rope_theta: float = 10000.0
  compress_rope_theta: float = 160000.0
  rope_factor: float = 16.0
  original_max_position_embeddings: int = 65536  # 0 disables YaRN (as the official original_seq_len=0)
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  max_position_embeddings: int = 1048576
  # Tokens.
  bos_token_id: int = 0
  eos_token_id: int = 1
  tie_word_embeddings: bool = False
  # Checkpoint format: routed-expert storage ("fp4" post-trained, "fp8" base models, None = unquantized).
  expert_dtype: str | None = "fp4"
  # Checkpoint format of the other linear weights: "fp8" = e4m3 with 128x128 ue8m0 block scales (the
  # official `quantization_config`), None = unquantized. Only describes files; the model math is the same.
  weight_quant: str | None = "fp8"
  # Numerics (not in config.json).
  simulate_quant: bool = True  # FP8 KV NoPE dims, FP4 + Hadamard indexer q/k, real rounding (spec §9)
  dtype: str = "bfloat16"  # activation / matmul dtype
  param_dtype: str = "float32"  # storage dtype of the parameters
  attention_impl: str = "reference"  # pallas_kernels.sparse_attention implementation
  scan_layers: bool = True
  # Routed-expert matmuls: "ragged" = exact grouped matmul (jax.lax.ragged_dot; native on TPU, slow on GPU),
  # "capacity" = einsum over [experts, capacity, d] buffers, tokens past an expert's capacity dropped (fast on
  # GPU), "alltoall" = expert parallel: capacity buffers sent over the mesh's "expert" axis with all_to_all to
  # the device holding the expert (dsv4_jax/model/moe_alltoall.py; needs a jax.set_mesh context, else it is
  # the capacity path), "exact" = no drops: capacity einsums with capacity = tokens for steps of few tokens
  # (moe.EXACT_CAPACITY_MAX_TOKENS; faster than ragged at decode batches on GPU), ragged for longer ones
  # (serving uses it), "auto" = capacity on GPU, ragged elsewhere.
  moe_impl: str = "auto"
  # The official code's float32 matmuls (output head, compressor projections). False: operands in `dtype`
  # with float32 accumulation, much faster on GPUs (float32 matmul runs at a fraction of bf16) for training.
  fp32_matmuls: bool = True
  moe_capacity_factor: float = 1.25  # capacity = ceil(factor · tokens · k / experts)

  def __post_init__(self):
    _coerce_types(self)
    _validate(self)

  # ----- derived ---------------------------------------------------------------------------------------
  @property
  def main_ratios(self) -> tuple[int, ...]:
    return tuple(self.compress_ratios[: self.num_hidden_layers])

  @property
  def mtp_ratios(self) -> tuple[int, ...]:
    return tuple(self.compress_ratios[self.num_hidden_layers :])

  def layer_kind(self, layer: int) -> LayerKind:
    return RATIO_TO_KIND[self.compress_ratios[layer]]

  @property
  def nope_head_dim(self) -> int:
    return self.head_dim - self.qk_rope_head_dim

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ----- constructors / serialization ------------------------------------------------------------------
  @classmethod
  def preset(cls, name: str, **overrides) -> "ModelConfig":
    """A named configuration (PRESETS), with optional field overrides."""
    if name not in PRESETS:
      raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})

  def to_dict(self) -> dict[str, Any]:
    """All fields under our own names, JSON-ready (compress_ratios as a list)."""
    d = dataclasses.asdict(self)
    d["compress_ratios"] = list(self.compress_ratios)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any], **overrides) -> "ModelConfig":
    """Inverse of to_dict; missing fields take their defaults, unknown keys are an error."""
    d = {**d, **overrides}
    unknown = sorted(set(d) - set(FIELD_NAMES))
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
    return cls(**d)

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> "ModelConfig":
    """From an official config.json: a checkpoint directory, a json file, or the parsed dict.

    Also accepts the inference-format names of `inference/config.json` (`dim`, `n_layers`, ...) when `dim`
    is present. Missing keys take ModelConfig defaults (the Flash values). `overrides` are our field names
    and win over the file. See `_hf_to_fields` for what is mapped, ignored and rejected.
    """
    d = _load_json(path_or_dict)
    fields = _hf_to_fields(d)
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s) in overrides: {', '.join(unknown)}")
    return cls(**{**fields, **overrides})

  def to_hf(self, quantized: bool | None = None) -> dict[str, Any]:
    """The official config.json dict; `from_hf(cfg.to_hf()) == cfg`.

    quantized=None describes the checkpoint this config says (weight_quant / expert_dtype as stored);
    quantized=False describes an unquantized checkpoint (what save_pretrained writes): no
    `quantization_config` and `expert_dtype: null`; quantized=True the official FP8 format (experts as
    expert_dtype, or FP8 when that is None). Non-default runtime fields (dtype, simulate_quant, ...)
    go under the extra key "dsv4_jax", which HF loaders ignore.
    """
    return _fields_to_hf(self, quantized)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ModelConfig))
_DEFAULTS = ModelConfig.__dataclass_fields__


# ----- validation ----------------------------------------------------------------------------------------
def _coerce_types(cfg: ModelConfig) -> None:
  """Type-check every field by its annotation; JSON-friendly conversions (list -> tuple, 16 -> 16.0)."""
  for f in dataclasses.fields(cfg):
    v, name, kind = getattr(cfg, f.name), f.name, f.type
    if kind == "int":
      if isinstance(v, float) and v.is_integer():
        v = int(v)
      if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} = {v!r} must be an integer")
    elif kind == "float":
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} = {v!r} must be a number")
      v = float(v)
    elif kind == "bool":
      if not isinstance(v, bool):
        raise ValueError(f"{name} = {v!r} must be true or false")
    elif kind == "tuple[int, ...]":
      if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise ValueError(f"{name} = {v!r} must be a list of integers")
      v = tuple(v)
    elif name in ("dtype", "param_dtype"):
      v = _dtype_name(name, v)
    elif kind == "str" and not isinstance(v, str):
      raise ValueError(f"{name} = {v!r} must be a string")
    elif kind == "str | None" and v is not None and not isinstance(v, str):
      raise ValueError(f"{name} = {v!r} must be a string or null")
    object.__setattr__(cfg, name, v)


def _dtype_name(name: str, v: Any) -> str:
  """A dtype name ('bfloat16'); also accepts dtype objects such as jnp.bfloat16."""
  if not isinstance(v, str):
    import ml_dtypes  # noqa: F401, PLC0415 (registers bfloat16 with numpy)
    import numpy as np  # noqa: PLC0415

    try:
      v = np.dtype(v).name
    except TypeError:
      raise ValueError(f"{name} = {v!r} is not a dtype") from None
  if v not in FLOAT_DTYPES:
    raise ValueError(f"{name} = {v!r} must be one of {', '.join(FLOAT_DTYPES)}")
  return v


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _validate(c: ModelConfig) -> None:
  """Raise ValueError naming the field and the rule for the first violated constraint."""

  def need(ok: bool, msg: str) -> None:
    if not ok:
      raise ValueError(msg)

  for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
               "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
               "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
               "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings"):
    need(getattr(c, name) >= 1, f"{name} = {getattr(c, name)} must be >= 1")
  for name in ("num_nextn_predict_layers", "num_hash_layers", "original_max_position_embeddings"):
    need(getattr(c, name) >= 0, f"{name} = {getattr(c, name)} must be >= 0")
  for name in ("routed_scaling_factor", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta",
               "rope_factor", "beta_slow"):
    need(getattr(c, name) > 0, f"{name} = {getattr(c, name)} must be > 0")
  need(c.swiglu_limit >= 0, f"swiglu_limit = {c.swiglu_limit} must be >= 0 (0 disables the clamp)")
  need(c.beta_fast > c.beta_slow, f"beta_fast = {c.beta_fast} must be > beta_slow = {c.beta_slow} (YaRN ramp)")
  # Attention.
  need(c.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim = {c.qk_rope_head_dim} must be even (RoPE rotates pairs)")
  nope = c.head_dim - c.qk_rope_head_dim
  need(nope > 0 and nope % 64 == 0,
       f"head_dim - qk_rope_head_dim = {nope} must be a positive multiple of 64 (FP8 KV blocks)")
  need(c.num_attention_heads % c.o_groups == 0,
       f"num_attention_heads = {c.num_attention_heads} must be divisible by o_groups = {c.o_groups}")
  n_layers = c.num_hidden_layers + c.num_nextn_predict_layers
  need(len(c.compress_ratios) == n_layers,
       f"len(compress_ratios) = {len(c.compress_ratios)} must equal num_hidden_layers + num_nextn_predict_layers"
       f" = {n_layers}")
  for i, r in enumerate(c.compress_ratios):
    need(r in RATIO_TO_KIND, f"compress_ratios[{i}] = {r} must be one of 0 (SWA), 4 (CSA), 128 (HCA)")
  # Indexer.
  need(_is_pow2(c.index_head_dim) and c.index_head_dim % 32 == 0,
       f"index_head_dim = {c.index_head_dim} must be a power of two and a multiple of 32 (Hadamard, FP4 blocks)")
  need(c.index_head_dim >= c.qk_rope_head_dim,
       f"index_head_dim = {c.index_head_dim} must be >= qk_rope_head_dim = {c.qk_rope_head_dim}")
  # MoE.
  need(c.num_experts_per_tok <= c.n_routed_experts,
       f"num_experts_per_tok = {c.num_experts_per_tok} must be <= n_routed_experts = {c.n_routed_experts}")
  need(c.num_hash_layers <= c.num_hidden_layers,
       f"num_hash_layers = {c.num_hash_layers} must be <= num_hidden_layers = {c.num_hidden_layers}")
  need(c.n_shared_experts in (0, 1), f"n_shared_experts = {c.n_shared_experts} must be 0 or 1")
  need(c.scoring_func == "sqrtsoftplus",
       f"scoring_func = {c.scoring_func!r} is not supported (DeepSeek-V4 uses 'sqrtsoftplus')")
  # Tokens and formats.
  for name in ("bos_token_id", "eos_token_id"):
    v = getattr(c, name)
    need(0 <= v < c.vocab_size, f"{name} = {v} must be in [0, vocab_size = {c.vocab_size})")
  need(not c.tie_word_embeddings, "tie_word_embeddings = True is not supported (V4 has a separate fp32 head)")
  need(c.expert_dtype in EXPERT_DTYPES, f"expert_dtype = {c.expert_dtype!r} must be one of None, 'fp4', 'fp8'")
  need(c.weight_quant in WEIGHT_QUANTS, f"weight_quant = {c.weight_quant!r} must be None or 'fp8'")
  need(c.attention_impl in ATTENTION_IMPLS,
       f"attention_impl = {c.attention_impl!r} must be one of {', '.join(ATTENTION_IMPLS)}")
  need(c.moe_impl in MOE_IMPLS, f"moe_impl = {c.moe_impl!r} must be one of {', '.join(MOE_IMPLS)}")
  need(c.moe_capacity_factor > 0, f"moe_capacity_factor = {c.moe_capacity_factor} must be > 0")


# ----- presets -------------------------------------------------------------------------------------------
def _official(**kw) -> dict[str, Any]:
  """Spec §1.1 values shared by Flash and Pro (checkpoint-faithful numerics), then the model's own."""
  base = dict(
    vocab_size=129280, num_nextn_predict_layers=1, head_dim=512, qk_rope_head_dim=64, o_lora_rank=1024,
    sliding_window=128, index_n_heads=64, index_head_dim=128, n_shared_experts=1, num_experts_per_tok=6,
    num_hash_layers=3, scoring_func="sqrtsoftplus", norm_topk_prob=True, swiglu_limit=10.0, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0,
    max_position_embeddings=1048576, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    expert_dtype="fp4", weight_quant="fp8", simulate_quant=True, dtype="bfloat16", param_dtype="float32",
  )
  return {**base, **kw}


_FLASH = _official(
  hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024, o_groups=8,
  compress_ratios=(0, 0) + (4, 128) * 20 + (4, 0), index_topk=512, n_routed_experts=256,
  moe_intermediate_size=2048, routed_scaling_factor=1.5,
)
_PRO = _official(
  hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
  compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0), index_topk=1024, n_routed_experts=384,
  moe_intermediate_size=3072, routed_scaling_factor=2.5,
)
# Small test models: float32, no QAT simulation, unquantized; official RoPE / mHC / routing constants.
_TINY = _official(
  vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=128, q_lora_rank=32,
  o_groups=2, o_lora_rank=32, sliding_window=16, compress_ratios=(0, 4, 128, 4, 0), index_n_heads=4,
  index_head_dim=64, index_topk=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
  num_hash_layers=1, routed_scaling_factor=1.5, max_position_embeddings=4096, expert_dtype=None,
  weight_quant=None, simulate_quant=False, dtype="float32",
)
PRESETS: dict[str, dict[str, Any]] = {
  "flash": _FLASH,
  "pro": _PRO,
  "flash-base": {**_FLASH, "expert_dtype": "fp8"},
  "pro-base": {**_PRO, "expert_dtype": "fp8"},
  # 4 layers: SWA, CSA, HCA, CSA + an SWA MTP layer.
  "tiny": _TINY,
  # Pro-like: starts with two HCA layers, then CSA/HCA; all 3 hash layers; Pro's route scale.
  "tiny-pro": {**_TINY, "num_hidden_layers": 5, "compress_ratios": (128, 128, 4, 128, 4, 0),
               "num_hash_layers": 3, "routed_scaling_factor": 2.5, "index_topk": 16},
  # ~100M parameters (66M of them the 129,280-row embedding and head): the CPU training job.
  "small": _official(
    hidden_size=256, num_hidden_layers=6, num_attention_heads=8, head_dim=128, q_lora_rank=128, o_groups=4,
    o_lora_rank=128, sliding_window=64, compress_ratios=(0, 4, 128, 4, 128, 4, 0), index_n_heads=8,
    index_head_dim=64, index_topk=64, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=256,
    num_hash_layers=1, max_position_embeddings=16384, expert_dtype=None, weight_quant=None,
    simulate_quant=False, dtype="float32",
  ),
}


# ----- Hugging Face config.json --------------------------------------------------------------------------
# config.json keys that equal our field names.
_HF_SAME = (
  "vocab_size", "hidden_size", "num_hidden_layers", "num_nextn_predict_layers", "num_attention_heads", "head_dim",
  "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "compress_ratios",
  "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
  "moe_intermediate_size", "num_hash_layers", "routed_scaling_factor", "scoring_func", "norm_topk_prob",
  "swiglu_limit", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta",
  "max_position_embeddings", "bos_token_id", "eos_token_id", "tie_word_embeddings",
)
# rope_scaling sub-keys -> fields.
_HF_ROPE = {"factor": "rope_factor", "original_max_position_embeddings": "original_max_position_embeddings",
            "beta_fast": "beta_fast", "beta_slow": "beta_slow"}
# Keys whose only supported value is the official one: checked, then dropped.
_HF_FIXED = {"model_type": "deepseek_v4", "num_key_value_heads": 1, "hidden_act": "silu",
             "topk_method": "noaux_tc", "attention_bias": False, "attention_dropout": 0.0}
# Keys that say nothing about the model math (HF bookkeeping, storage dtype, init scale): dropped.
_HF_IGNORED = {"architectures", "torch_dtype", "dtype", "transformers_version", "initializer_range", "use_cache",
               "_name_or_path", "pad_token_id", "output_attentions", "output_hidden_states", "return_dict"}
# inference/config.json (official ModelArgs) names -> fields.
_INFERENCE_NAMES = {
  "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_mtp_layers": "num_nextn_predict_layers",
  "n_heads": "num_attention_heads", "moe_inter_dim": "moe_intermediate_size", "n_hash_layers": "num_hash_layers",
  "n_activated_experts": "num_experts_per_tok", "score_func": "scoring_func", "route_scale": "routed_scaling_factor",
  "rope_head_dim": "qk_rope_head_dim", "window_size": "sliding_window", "original_seq_len":
  "original_max_position_embeddings", "norm_eps": "rms_norm_eps", "rope_factor": "rope_factor",
  **{k: k for k in ("vocab_size", "n_routed_experts", "n_shared_experts", "swiglu_limit", "q_lora_rank",
                    "head_dim", "o_groups", "o_lora_rank", "rope_theta", "beta_fast", "beta_slow", "index_n_heads",
                    "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
                    "compress_rope_theta", "compress_ratios", "expert_dtype")},
}
# Runtime-only ModelArgs keys (buffer sizes, scale storage): dropped.
_INFERENCE_IGNORED = {"max_batch_size", "max_seq_len", "scale_dtype"}


def _load_json(path_or_dict: str | os.PathLike | dict) -> dict[str, Any]:
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict)
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file at {path}")
  with open(path) as f:
    return json.load(f)


def _hf_to_fields(d: dict[str, Any]) -> dict[str, Any]:
  """Map an official config dict to ModelConfig fields; reject what this implementation does not support."""
  dspark = sorted(k for k in d if k.startswith("dspark"))
  if dspark:
    raise ValueError(
      f"config has {', '.join(dspark)}: a DeepSeek-V4-Flash-0731 / V4.1 checkpoint (DSpark drafter instead of "
      "MTP), a different checkpoint family that is not supported (spec §18)")
  if "dim" in d:
    return _inference_to_fields(d)
  d = dict(d)
  out = {k: d.pop(k) for k in _HF_SAME if k in d}
  for key, want in _HF_FIXED.items():
    value = d.pop(key, want)
    if value != want:
      raise ValueError(f"config.json {key} = {value!r} is not supported (DeepSeek-V4 has {want!r})")
  if "rope_scaling" in d:
    out.update(_rope_scaling_to_fields(d.pop("rope_scaling")))
  quant = d.pop("quantization_config", None)
  out["weight_quant"] = _check_quantization_config(quant) if quant is not None else None
  # Official code: experts without expert_dtype are stored like the other weights.
  out["expert_dtype"] = d.pop("expert_dtype") if "expert_dtype" in d else out["weight_quant"]
  runtime = d.pop(RUNTIME_KEY, None) or {}
  bad = sorted(set(runtime) - set(RUNTIME_FIELDS))
  if bad:
    raise ValueError(f"config.json {RUNTIME_KEY} has unknown key(s): {', '.join(bad)}")
  out.update(runtime)
  _warn_unknown(d, _HF_IGNORED)
  return out


def _rope_scaling_to_fields(rs: dict[str, Any] | None) -> dict[str, Any]:
  if rs is None:  # explicit null: no YaRN anywhere
    return {"original_max_position_embeddings": 0}
  rs = dict(rs)
  kind = rs.pop("type", rs.pop("rope_type", "yarn"))
  rs.pop("rope_type", None)
  if kind != "yarn":
    raise ValueError(f"rope_scaling.type = {kind!r} is not supported (DeepSeek-V4 uses 'yarn')")
  out = {field: rs.pop(key) for key, field in _HF_ROPE.items() if key in rs}
  for key, v in rs.items():
    if key in ("mscale", "mscale_all_dim") and not v:
      continue  # V4 applies no mscale (spec §4); 0 / null agree with that
    raise ValueError(f"rope_scaling.{key} = {v!r} is not supported")
  return out


def _check_quantization_config(q: dict[str, Any]) -> str:
  """The official FP8 block format is the only one we read; returns weight_quant = 'fp8'."""
  for key, want in OFFICIAL_QUANTIZATION_CONFIG.items():
    if key in q and q[key] != want:
      raise ValueError(f"quantization_config.{key} = {q[key]!r} is not supported (only the official {want!r})")
  return "fp8"


def _inference_to_fields(d: dict[str, Any]) -> dict[str, Any]:
  d = dict(d)
  out = {field: d.pop(key) for key, field in _INFERENCE_NAMES.items() if key in d}
  dtype = d.pop("dtype", "fp8")  # ModelArgs.dtype: storage of the non-expert weights
  if dtype not in ("fp8", "bf16"):
    raise ValueError(f"inference config dtype = {dtype!r} must be 'fp8' or 'bf16'")
  out["weight_quant"] = "fp8" if dtype == "fp8" else None
  scale_fmt = d.pop("scale_fmt", "ue8m0")
  if scale_fmt not in (None, "ue8m0"):
    raise ValueError(f"inference config scale_fmt = {scale_fmt!r} must be 'ue8m0' or null")
  out.setdefault("expert_dtype", out["weight_quant"])
  _warn_unknown(d, _INFERENCE_IGNORED)
  return out


def _warn_unknown(rest: dict[str, Any], ignored: set[str]) -> None:
  unknown = sorted(set(rest) - ignored)
  if unknown:
    warnings.warn(f"ModelConfig.from_hf ignores unknown config key(s): {', '.join(unknown)}", stacklevel=4)


def _num(x: float) -> float | int:
  """16.0 -> 16, as the official file writes integral constants."""
  return int(x) if float(x).is_integer() else x


def _fields_to_hf(c: ModelConfig, quantized: bool | None) -> dict[str, Any]:
  if quantized is None:
    weight_quant, expert_dtype = c.weight_quant, c.expert_dtype
  elif quantized:
    weight_quant, expert_dtype = "fp8", c.expert_dtype or "fp8"
  else:
    weight_quant, expert_dtype = None, None
  d: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], **_HF_FIXED}
  d.update({k: getattr(c, k) for k in _HF_SAME})
  d["compress_ratios"] = list(c.compress_ratios)
  for k in ("rope_theta", "compress_rope_theta"):
    d[k] = _num(d[k])
  d["expert_dtype"] = expert_dtype
  if weight_quant == "fp8":
    d["quantization_config"] = json.loads(json.dumps(OFFICIAL_QUANTIZATION_CONFIG))
  d["rope_scaling"] = {"beta_fast": _num(c.beta_fast), "beta_slow": _num(c.beta_slow),
                       "factor": _num(c.rope_factor),
                       "original_max_position_embeddings": c.original_max_position_embeddings, "type": "yarn"}
  d.update(initializer_range=0.02, torch_dtype="bfloat16", use_cache=True)
  runtime = {k: getattr(c, k) for k in RUNTIME_FIELDS if getattr(c, k) != _DEFAULTS[k].default}
  if runtime:
    d[RUNTIME_KEY] = runtime
  return dict(sorted(d.items()))


# ----- loading from a command-line style spec ------------------------------------------------------------
def load_model_config(spec: str, **overrides) -> ModelConfig:
  """A ModelConfig from a preset name, a checkpoint dir, a config.json or an ml_collections .py file."""
  if spec in PRESETS:
    return ModelConfig.preset(spec, **overrides)
  path, _, arg = spec.partition(":") if ".py:" in spec else (spec, "", "")
  if path.endswith(".py"):
    return _config_from_py(path, arg or None, overrides)
  if os.path.isdir(spec) or spec.endswith(".json"):
    return ModelConfig.from_hf(spec, **overrides)
  raise ValueError(f"not a preset ({', '.join(PRESETS)}), a directory, a .json or a .py file")


def _config_from_py(path: str, arg: str | None, overrides: dict[str, Any]) -> ModelConfig:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file at {path}")
  module_spec = importlib.util.spec_from_file_location(f"_dsv4_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  if isinstance(cfg, ModelConfig):
    return cfg.replace(**overrides)
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return ModelConfig.from_dict(d, **overrides)
