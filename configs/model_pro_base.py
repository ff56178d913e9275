# DeepSeek-V4 Pro-Base model config (ModelConfig fields; the numbers live in ModelConfig.preset("pro-base")).
#
#   dsv4 info --config configs/model_pro_base.py
"""ml_collections config: DeepSeek-V4 Pro-Base (preset "pro-base")."""

import ml_collections

from dsv4_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(ModelConfig.preset("pro-base").to_dict())
