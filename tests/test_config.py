"""Tests for dsv4_jax.config: presets vs the spec tables, validation messages, HF config.json in/out."""

from __future__ import annotations

import json
import pathlib

import pytest

from dsv4_jax.config import FIELD_NAMES, PRESETS, ModelConfig

DATA = pathlib.Path(__file__).parent / "data"


def official_pro() -> dict:
  """The official DeepSeek-V4-Pro config.json (mirror commit 0ec3a03)."""
  return json.loads((DATA / "pro_config.json").read_text())


def official_flash() -> dict:
  """Spec §1.3: Flash's config.json is Pro's with these keys changed."""
  return {**official_pro(), "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
          "q_lora_rank": 1024, "o_groups": 8, "moe_intermediate_size": 2048, "n_routed_experts": 256,
          "routed_scaling_factor": 1.5, "index_topk": 512, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]}


# Spec §1.1 headline table, typed in from the spec (not from the preset).
COMMON = dict(
  vocab_size=129280, num_nextn_predict_layers=1, head_dim=512, qk_rope_head_dim=64, o_lora_rank=1024,
  sliding_window=128, index_n_heads=64, index_head_dim=128, n_shared_experts=1, num_experts_per_tok=6,
  num_hash_layers=3, scoring_func="sqrtsoftplus", norm_topk_prob=True, swiglu_limit=10.0, hc_mult=4,
  hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000, compress_rope_theta=160000,
  rope_factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1,
  max_position_embeddings=1048576, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
  simulate_quant=True, weight_quant="fp8",
)
SPEC = {
  "flash": dict(COMMON, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024,
                o_groups=8, n_routed_experts=256, moe_intermediate_size=2048, routed_scaling_factor=1.5,
                index_topk=512, expert_dtype="fp4"),
  "pro": dict(COMMON, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
              o_groups=16, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
              index_topk=1024, expert_dtype="fp4"),
}


# ----- presets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flash", "pro"])
def test_preset_matches_spec_table(name):
  cfg = ModelConfig.preset(name)
  for field, want in SPEC[name].items():
    assert getattr(cfg, field) == want, field


def test_flash_schedule():
  cfg = ModelConfig.preset("flash")
  kinds = [cfg.layer_kind(i) for i in range(44)]
  assert kinds[:2] == ["swa", "swa"] and kinds[43] == "swa"  # MTP layer is SWA-only
  assert [i for i, k in enumerate(kinds) if k == "csa"] == list(range(2, 43, 2))
  assert [i for i, k in enumerate(kinds) if k == "hca"] == list(range(3, 42, 2))
  assert cfg.mtp_ratios == (0,) and len(cfg.main_ratios) == 43


def test_pro_schedule():
  cfg = ModelConfig.preset("pro")
  kinds = [cfg.layer_kind(i) for i in range(62)]
  assert [i for i, k in enumerate(kinds) if k == "hca"] == [0, 1] + list(range(3, 60, 2))
  assert [i for i, k in enumerate(kinds) if k == "csa"] == list(range(2, 61, 2))
  assert kinds[61] == "swa"


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_base_presets_store_experts_in_fp8(name):
  base, post = ModelConfig.preset(f"{name}-base"), ModelConfig.preset(name)
  assert base.expert_dtype == "fp8" and post.expert_dtype == "fp4"
  assert base == post.replace(expert_dtype="fp8")
  assert base.simulate_quant and post.simulate_quant


@pytest.mark.parametrize("name", ["tiny", "tiny-pro"])
def test_tiny_presets_cover_all_layer_kinds(name):
  cfg = ModelConfig.preset(name)
  assert {cfg.layer_kind(i) for i in range(cfg.num_hidden_layers)} == {"swa", "csa", "hca"} - (
    {"swa"} if name == "tiny-pro" else set())
  assert cfg.mtp_ratios == (0,)
  assert not cfg.simulate_quant and cfg.dtype == "float32" and cfg.hidden_size == 64
  assert cfg.num_hash_layers >= 1


def test_tiny_pro_starts_with_hca():
  assert ModelConfig.preset("tiny-pro").main_ratios[:2] == (128, 128)


def test_preset_overrides_and_unknown_name():
  assert ModelConfig.preset("tiny", dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ValueError, match="valid presets: flash, pro, flash-base, pro-base, tiny"):
    ModelConfig.preset("ultra")


def test_all_presets_construct_and_hash():
  cfgs = [ModelConfig.preset(n) for n in PRESETS]
  assert len(set(cfgs)) == len(cfgs)  # frozen + hashable: usable as a jit static argument


def test_default_is_flash():
  assert ModelConfig() == ModelConfig.preset("flash")


# ----- validation ----------------------------------------------------------------------------------------
BAD = [
  (dict(head_dim=164), "head_dim - qk_rope_head_dim = 100 must be a positive multiple of 64 (FP8 KV blocks)"),
  (dict(head_dim=64), "head_dim - qk_rope_head_dim = 0 must be a positive multiple of 64"),
  (dict(qk_rope_head_dim=63, head_dim=127), "qk_rope_head_dim = 63 must be even"),
  (dict(o_groups=3), "num_attention_heads = 4 must be divisible by o_groups = 3"),
  (dict(compress_ratios=(0, 4, 128, 4)), "len(compress_ratios) = 4 must equal num_hidden_layers + "
                                         "num_nextn_predict_layers = 5"),
  (dict(compress_ratios=(0, 4, 64, 4, 0)), "compress_ratios[2] = 64 must be one of 0 (SWA), 4 (CSA), 128"),
  (dict(index_head_dim=96), "index_head_dim = 96 must be a power of two and a multiple of 32"),
  (dict(index_head_dim=16), "index_head_dim = 16 must be a power of two and a multiple of 32"),
  (dict(index_head_dim=32), "index_head_dim = 32 must be >= qk_rope_head_dim = 64"),
  (dict(index_n_heads=0), "index_n_heads = 0 must be >= 1"),
  (dict(index_topk=0), "index_topk = 0 must be >= 1"),
  (dict(num_experts_per_tok=9), "num_experts_per_tok = 9 must be <= n_routed_experts = 8"),
  (dict(num_hash_layers=5), "num_hash_layers = 5 must be <= num_hidden_layers = 4"),
  (dict(num_hash_layers=-1), "num_hash_layers = -1 must be >= 0"),
  (dict(n_shared_experts=2), "n_shared_experts = 2 must be 0 or 1"),
  (dict(scoring_func="sigmoid"), "scoring_func = 'sigmoid' is not supported"),
  (dict(hidden_size=0), "hidden_size = 0 must be >= 1"),
  (dict(vocab_size=-3), "vocab_size = -3 must be >= 1"),
  (dict(moe_intermediate_size=0), "moe_intermediate_size = 0 must be >= 1"),
  (dict(rms_norm_eps=0.0), "rms_norm_eps = 0.0 must be > 0"),
  (dict(hc_eps=-1e-6), "hc_eps = -1e-06 must be > 0"),
  (dict(dtype="int8"), "dtype = 'int8' must be one of float32, bfloat16, float16"),
  (dict(param_dtype="float8"), "param_dtype = 'float8' must be one of"),
  (dict(dtype=3), "dtype = 3 is not a dtype"),
  (dict(attention_impl="triton"), "attention_impl = 'triton' must be one of reference, tpu, gpu, auto"),
  (dict(expert_dtype="int4"), "expert_dtype = 'int4' must be one of None, 'fp4', 'fp8'"),
  (dict(weight_quant="fp4"), "weight_quant = 'fp4' must be None or 'fp8'"),
  (dict(hc_mult=0), "hc_mult = 0 must be >= 1"),
  (dict(sliding_window=0), "sliding_window = 0 must be >= 1"),
  (dict(swiglu_limit=-1.0), "swiglu_limit = -1.0 must be >= 0"),
  (dict(beta_fast=1.0), "beta_fast = 1.0 must be > beta_slow = 1.0"),
  (dict(rope_factor=0), "rope_factor = 0.0 must be > 0"),
  (dict(eos_token_id=512), "eos_token_id = 512 must be in [0, vocab_size = 512)"),
  (dict(tie_word_embeddings=True), "tie_word_embeddings = True is not supported"),
  (dict(num_hidden_layers=2.5), "num_hidden_layers = 2.5 must be an integer"),
  (dict(num_attention_heads=True), "num_attention_heads = True must be an integer"),
  (dict(rope_theta="1e4"), "rope_theta = '1e4' must be a number"),
  (dict(simulate_quant=1), "simulate_quant = 1 must be true or false"),
  (dict(compress_ratios="0,4"), "compress_ratios = '0,4' must be a list of integers"),
  (dict(expert_dtype=4), "expert_dtype = 4 must be a string or null"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[next(iter(c)) + f"-{i}" for i, (c, _) in enumerate(BAD)])
def test_validation_errors_name_field_and_rule(change, message):
  with pytest.raises(ValueError) as e:
    ModelConfig.preset("tiny").replace(**change)
  assert message in str(e.value)
  assert next(iter(change)) in str(e.value)  # names the field


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_every_field_is_type_checked(name):
  with pytest.raises(ValueError, match=name):
    ModelConfig.preset("tiny").replace(**{name: object()})


def test_json_friendly_coercion():
  import jax.numpy as jnp

  cfg = ModelConfig.preset("tiny").replace(compress_ratios=[0, 4, 128, 4, 0], rope_theta=10000,
                                           num_hidden_layers=4.0, dtype=jnp.bfloat16)
  assert cfg.compress_ratios == (0, 4, 128, 4, 0) and isinstance(cfg.compress_ratios, tuple)
  assert isinstance(cfg.rope_theta, float) and isinstance(cfg.num_hidden_layers, int)
  assert cfg.dtype == "bfloat16"
  hash(cfg)


# ----- own dict format -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_to_dict_round_trip(name):
  cfg = ModelConfig.preset(name)
  d = json.loads(json.dumps(cfg.to_dict()))
  assert set(d) == set(FIELD_NAMES)
  assert ModelConfig.from_dict(d) == cfg


def test_from_dict_rejects_unknown_keys_and_takes_overrides():
  with pytest.raises(ValueError, match="unknown ModelConfig field.*hiden_size"):
    ModelConfig.from_dict({"hiden_size": 4})
  d = ModelConfig.preset("tiny").to_dict()
  assert ModelConfig.from_dict(d, dtype="bfloat16").dtype == "bfloat16"


# ----- Hugging Face config.json --------------------------------------------------------------------------
def test_from_hf_official_pro_equals_preset():
  assert ModelConfig.from_hf(official_pro()) == ModelConfig.preset("pro")


def test_from_hf_flash_equals_preset():
  assert ModelConfig.from_hf(official_flash()) == ModelConfig.preset("flash")


def test_from_hf_reads_directory_and_file(tmp_path):
  (tmp_path / "config.json").write_text((DATA / "pro_config.json").read_text())
  assert ModelConfig.from_hf(tmp_path) == ModelConfig.preset("pro")
  assert ModelConfig.from_hf(str(DATA / "pro_config.json")) == ModelConfig.preset("pro")
  with pytest.raises(FileNotFoundError):
    ModelConfig.from_hf(tmp_path / "nothing")


def test_from_hf_inference_format_names():
  d = json.loads((DATA / "pro_inference_config.json").read_text())
  assert "dim" in d and "hidden_size" not in d
  assert ModelConfig.from_hf(d) == ModelConfig.preset("pro")
  bf16 = ModelConfig.from_hf({**d, "dtype": "bf16", "expert_dtype": None, "max_seq_len": 64})
  assert bf16.weight_quant is None and bf16.expert_dtype is None
  with pytest.raises(ValueError, match="inference config dtype = 'fp16'"):
    ModelConfig.from_hf({**d, "dtype": "fp16"})


def test_from_hf_overrides():
  cfg = ModelConfig.from_hf(official_pro(), dtype="float32", simulate_quant=False, num_hidden_layers=3,
                            compress_ratios=(128, 128, 4, 0))
  assert cfg.dtype == "float32" and not cfg.simulate_quant and cfg.num_hidden_layers == 3
  with pytest.raises(ValueError, match="unknown ModelConfig field.*hidden"):
    ModelConfig.from_hf(official_pro(), hidden=3)


def test_from_hf_expert_dtype_defaults_follow_weights():
  d = official_pro()
  del d["expert_dtype"]
  assert ModelConfig.from_hf(d).expert_dtype == "fp8"  # official code: experts stored like the rest
  del d["quantization_config"]
  cfg = ModelConfig.from_hf(d)
  assert cfg.expert_dtype is None and cfg.weight_quant is None


def test_from_hf_rope_scaling_null_disables_yarn():
  assert ModelConfig.from_hf({**official_pro(), "rope_scaling": None}).original_max_position_embeddings == 0


@pytest.mark.parametrize("change,message", [
  ({"num_key_value_heads": 8}, "num_key_value_heads = 8 is not supported"),
  ({"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
  ({"model_type": "deepseek_v3"}, "model_type = 'deepseek_v3' is not supported"),
  ({"topk_method": "group_limited_greedy"}, "topk_method = 'group_limited_greedy' is not supported"),
  ({"attention_bias": True}, "attention_bias = True is not supported"),
  ({"dspark_num_layers": 1}, r"dspark_num_layers.*different checkpoint family.*spec §18"),
  ({"rope_scaling": {"type": "linear", "factor": 4}}, "rope_scaling.type = 'linear' is not supported"),
  ({"rope_scaling": {"type": "yarn", "mscale": 0.7}}, "rope_scaling.mscale = 0.7 is not supported"),
  ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "quantization_config.fmt = 'e5m2'"),
  ({"scoring_func": "sigmoid"}, "scoring_func = 'sigmoid' is not supported"),
  ({"compress_ratios": [128] * 46}, r"len\(compress_ratios\) = 46 must equal"),
])
def test_from_hf_rejects_unsupported(change, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_hf({**official_pro(), **change})


def test_from_hf_warns_on_unknown_keys():
  with pytest.warns(UserWarning, match="frobnicate"):
    cfg = ModelConfig.from_hf({**official_pro(), "frobnicate": 1})
  assert cfg == ModelConfig.preset("pro")


def test_to_hf_equals_official_pro():
  want = official_pro()
  del want["transformers_version"]  # not ours to claim
  assert ModelConfig.preset("pro").to_hf() == want
  assert json.loads(json.dumps(ModelConfig.preset("pro").to_hf())) == want


@pytest.mark.parametrize("name", list(PRESETS))
def test_to_hf_round_trip(name):
  cfg = ModelConfig.preset(name)
  assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_to_hf_round_trip_keeps_runtime_fields():
  cfg = ModelConfig.preset("tiny", attention_impl="auto", scan_layers=False, param_dtype="bfloat16")
  d = cfg.to_hf()
  assert d["dsv4_jax"] == {"simulate_quant": False, "dtype": "float32", "param_dtype": "bfloat16",
                           "attention_impl": "auto", "scan_layers": False}
  assert ModelConfig.from_hf(d) == cfg
  assert "dsv4_jax" not in ModelConfig.preset("flash").to_hf()


def test_to_hf_unquantized():
  cfg = ModelConfig.preset("flash")
  d = cfg.to_hf(quantized=False)
  assert "quantization_config" not in d and d["expert_dtype"] is None
  assert ModelConfig.from_hf(d) == cfg.replace(weight_quant=None, expert_dtype=None)
  q = ModelConfig.preset("tiny").to_hf(quantized=True)
  assert q["quantization_config"]["weight_block_size"] == [128, 128] and q["expert_dtype"] == "fp8"
