# DeepSeek-V4 tiny test model config (ModelConfig fields; the numbers live in ModelConfig.preset("tiny")).
#
#   dsv4 info --config configs/model_tiny.py
"""ml_collections config: DeepSeek-V4 tiny test (preset "tiny")."""

import ml_collections

from dsv4_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(ModelConfig.preset("tiny").to_dict())
