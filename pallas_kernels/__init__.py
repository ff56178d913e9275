"""Pallas kernels for DeepSeek-V4's sparse attention path. Imports nothing from dsv4_jax.

Each op has a pure-JAX reference (the definition and the fallback) and backend kernels selected per call with
`implementation="auto" | "reference" | "tpu" | "gpu"`.
"""

from pallas_kernels.compress import compress
from pallas_kernels.indexer_topk import indexer_topk
from pallas_kernels.paged_index_scores import paged_index_scores
from pallas_kernels.sparse_attention import sparse_attention

__all__ = ["compress", "indexer_topk", "paged_index_scores", "sparse_attention"]
