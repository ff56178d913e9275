"""dsv4_jax: DeepSeek-V4 in JAX/Flax NNX."""

from dsv4_jax.config import ModelConfig
from dsv4_jax.model.transformer import DeepSeekV4, ModelOutput
from dsv4_jax.model.unstack import unstack_layers
from dsv4_jax.weights import load_pretrained, save_pretrained
