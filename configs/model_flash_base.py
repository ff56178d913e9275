# DeepSeek-V4 Flash-Base model config (ModelConfig fields; the numbers live in ModelConfig.preset("flash-base")).
#
#   dsv4 info --config configs/model_flash_base.py
"""ml_collections config: DeepSeek-V4 Flash-Base (preset "flash-base")."""

import ml_collections

from dsv4_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(ModelConfig.preset("flash-base").to_dict())
