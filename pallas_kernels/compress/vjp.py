"""One custom_vjp for every implementation of the op.

Forward: the implementation's kernel. Backward: for "tpu", the Mosaic TPU backward kernel (tpu_bwd.py; TPU
interpret mode off TPU); for "reference" and "gpu", the VJP of the pure-JAX reference (recomputed from the inputs;
its gathers are [B, N, coff·m, coff·c], the size of the inputs). No gradient to the slot arrays (integers).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.compress import gpu, tpu, tpu_bwd
from pallas_kernels.compress.reference import Spec, compress_reference

_FORWARD = {"reference": compress_reference, "tpu": tpu.compress_tpu, "gpu": gpu.compress_gpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def compress_vjp(kv, score, ape, weight, end, has_prev, positions, spec: Spec, implementation: str):
  """Entries [B, N, c]; `implementation` is "reference", "tpu" or "gpu"."""
  return _FORWARD[implementation](kv, score, ape, weight, end, has_prev, positions, spec)


def _fwd(kv, score, ape, weight, end, has_prev, positions, spec, implementation):
  out = _FORWARD[implementation](kv, score, ape, weight, end, has_prev, positions, spec)
  return out, (kv, score, ape, weight, end, has_prev, positions)


def _bwd(spec, implementation, residuals, d_out):
  kv, score, ape, weight, end, has_prev, positions = residuals
  if implementation == "tpu":
    grads = tpu_bwd.compress_tpu_bwd(kv, score, ape, weight, end, has_prev, positions, d_out, spec)
    return grads + (None, None, None)
  _, pullback = jax.vjp(lambda a, b, c, d: compress_reference(a, b, c, d, end, has_prev, positions, spec),
                        kv, score, ape, weight)
  return pullback(d_out) + (None, None, None)


compress_vjp.defvjp(_fwd, _bwd)
