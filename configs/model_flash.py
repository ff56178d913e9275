# DeepSeek-V4 Flash model config (ModelConfig fields; the numbers live in ModelConfig.preset("flash")).
#
#   dsv4 info --config configs/model_flash.py
"""ml_collections config: DeepSeek-V4 Flash (preset "flash")."""

import ml_collections

from dsv4_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(ModelConfig.preset("flash").to_dict())
