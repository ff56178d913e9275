"""`sparse_attention(q, kv, sink, indices, *, scale, implementation)`: the op's single entry point."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention.vjp import sparse_attention_vjp

_IMPLEMENTATIONS = ("auto", "reference", "tpu", "gpu")


def sparse_attention(q, kv, sink, indices, *, scale: float, implementation: str = "auto"):
  """Softmax over the keys each query selected (plus a per-head sink) of one shared K=V head.

  q [B,S,H,D], kv [B,T,D], sink [H] float32, indices [B,S,K] int32 (-1 = none).
  Returns (out [B,S,H,D] in q's dtype, lse [B,S,H] float32 including the sink). Differentiable in q, kv and
  sink through one shared backward (vjp.py). "auto" is the TPU kernels on a TPU backend, the Mosaic GPU kernels
  (gpu.py, gpu_bwd.py; 16-bit matmul operands) on an NVIDIA backend for bf16/f16 inputs, else the reference;
  "tpu" elsewhere runs the kernels in TPU interpret mode (slow: for tests); "gpu" needs a Hopper GPU.
  """
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; expected one of {_IMPLEMENTATIONS}")
  if q.ndim != 4 or kv.ndim != 3 or indices.ndim != 3:
    raise ValueError(f"expected q [B,S,H,D], kv [B,T,D], indices [B,S,K]; got q{q.shape} kv{kv.shape} "
                     f"indices{indices.shape}")
  if q.shape[-1] != kv.shape[-1] or q.shape[:2] != indices.shape[:2] or q.shape[0] != kv.shape[0]:
    raise ValueError(f"shape mismatch: q{q.shape} kv{kv.shape} indices{indices.shape}")
  if sink.shape != (q.shape[2],):
    raise ValueError(f"sink must be [H={q.shape[2]}], got {sink.shape}")
  if q.shape[-1] > 512:
    raise ValueError(f"head dim {q.shape[-1]} > 512 is not supported")
  backend = jax.default_backend()
  if implementation == "gpu" and backend != "gpu":
    raise ValueError(f"implementation='gpu' needs an NVIDIA GPU (Hopper) backend; this one is {backend!r}. Use "
                     "'auto' (the TPU kernel on TPU, the Mosaic GPU kernel on GPU for 16-bit inputs, else the "
                     "reference), 'reference', or 'tpu' (interpret mode off TPU)")
  if implementation == "auto":
    if backend == "tpu":
      implementation = "tpu"
    elif backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and kv.dtype == q.dtype:
      implementation = "gpu"
    else:
      implementation = "reference"
  return sparse_attention_vjp(q, kv, sink, indices, float(scale), implementation)
