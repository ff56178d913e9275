# DeepSeek-V4 Pro model config (ModelConfig fields; the numbers live in ModelConfig.preset("pro")).
#
#   dsv4 info --config configs/model_pro.py
"""ml_collections config: DeepSeek-V4 Pro (preset "pro")."""

import ml_collections

from dsv4_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(ModelConfig.preset("pro").to_dict())
