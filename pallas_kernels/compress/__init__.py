"""`compress(kv, score, ape, norm_weight, end, has_prev, positions, ...)`: the op's single entry point."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.compress import gpu, tpu
from pallas_kernels.compress.reference import Spec, block_slots, compress_reference, fp8_row_bytes, pack_fp8
from pallas_kernels.compress.vjp import compress_vjp

_IMPLEMENTATIONS = ("auto", "reference", "tpu", "gpu")
_OUTPUTS = ("entries", "fp8")

__all__ = ["compress", "block_slots", "fp8_row_bytes", "pack_fp8"]


def compress(kv, score, ape, norm_weight, end, has_prev, positions, *, ratio: int, rope_freqs, eps: float = 1e-6,
             out_dtype=None, output: str = "entries", implementation: str = "auto"):
  """Softmax-gated pooling of blocks of `ratio` rows, RMSNorm, RoPE: one KV entry per slot (spec §5).

  kv, score [B, S, C]: projected rows and gate logits of every token; C = c, or 2c for the CSA overlap (channels
  [:c] feed the next block, [c:] the block itself). ape [ratio, C]: the gate's position bias. norm_weight [c].
  end [B, N] int32: each slot's last row (-1 = no slot); has_prev [B, N] bool: the `ratio` rows before the block
  are in its document (overlap only); positions [B, N] int32: RoPE position of the entry (block index · ratio).
  `block_slots(positions_BS, segment_BS, ratio)` builds the three for packed documents.
  rope_freqs: inverse frequencies of the last 2·len(rope_freqs) dims. out_dtype: the entries' (default kv's).

  output="entries": [B, N, c] in out_dtype (zeros where end < 0), differentiable in kv, score, ape and
  norm_weight. output="fp8": uint8 [B, N, fp8_row_bytes(c, rope)], the spec §8.1 cache layout of the entries
  (serving; no gradient). "auto" is the TPU kernel on a TPU backend, the Mosaic GPU kernel on an NVIDIA backend
  (where it takes the shape: c even, rope dims / 2 a power of two <= 128), else the reference; "tpu" elsewhere
  runs the kernel in TPU interpret mode (slow: for tests); "gpu" needs an NVIDIA (Hopper) GPU. The TPU
  kernel's backward is a Mosaic kernel too (it needs slots whose blocks are disjoint, as block_slots builds them);
  the others' is the reference's VJP.
  """
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; expected one of {_IMPLEMENTATIONS}")
  if output not in _OUTPUTS:
    raise ValueError(f"output={output!r}; expected one of {_OUTPUTS}")
  spec = _check(kv, score, ape, norm_weight, end, has_prev, positions, ratio, rope_freqs, eps, out_dtype)
  backend = jax.default_backend()
  if implementation == "gpu" and backend != "gpu":
    raise ValueError(f"implementation='gpu' needs an NVIDIA GPU (Hopper) backend; this one is {backend!r}. Use "
                     "'reference' (or 'auto', which picks the kernel of the backend)")
  if implementation == "auto":
    gpu_ok = backend == "gpu" and gpu.supports(norm_weight.shape[0], spec)
    implementation = "tpu" if backend == "tpu" else "gpu" if gpu_ok else "reference"
  end, positions = end.astype(jnp.int32), positions.astype(jnp.int32)
  has_prev = has_prev.astype(bool)
  if output == "fp8":
    args = [jax.lax.stop_gradient(a) for a in (kv, score, ape, norm_weight)]
    if implementation == "tpu":
      return tpu.compress_tpu(*args, end, has_prev, positions, spec, fp8=True)
    if implementation == "gpu":
      return gpu.compress_gpu(*args, end, has_prev, positions, spec, fp8=True)
    return pack_fp8(compress_reference(*args, end, has_prev, positions, spec), spec.rope_dim)
  return compress_vjp(kv, score, ape, norm_weight, end, has_prev, positions, spec, implementation)


def _check(kv, score, ape, weight, end, has_prev, positions, ratio, rope_freqs, eps, out_dtype) -> Spec:
  if kv.ndim != 3 or kv.shape != score.shape:
    raise ValueError(f"kv and score must be [B, S, C] of one shape; got kv{kv.shape} score{score.shape}")
  if weight.ndim != 1:
    raise ValueError(f"norm_weight must be [c]; got {weight.shape}")
  B, S, C = kv.shape
  c = weight.shape[0]
  if C not in (c, 2 * c):
    raise ValueError(f"kv's channels ({C}) must be norm_weight's c = {c}, or 2c with the overlap")
  if ape.shape != (ratio, C):
    raise ValueError(f"ape must be [ratio={ratio}, C={C}]; got {ape.shape}")
  for name, a in (("end", end), ("has_prev", has_prev), ("positions", positions)):
    if a.ndim != 2 or a.shape[0] != B:
      raise ValueError(f"{name} must be [B={B}, N]; got {a.shape}")
  if not end.shape == has_prev.shape == positions.shape:
    raise ValueError(f"end, has_prev, positions must share [B, N]; got {end.shape} {has_prev.shape} "
                     f"{positions.shape}")
  freqs = tuple(float(f) for f in np.asarray(rope_freqs, np.float32).reshape(-1))  # static: numbers, not tracers
  if not 0 < 2 * len(freqs) <= c:
    raise ValueError(f"rope dims 2·len(rope_freqs) = {2 * len(freqs)} must be in (0, c = {c}]")
  dtype = jnp.dtype(kv.dtype if out_dtype is None else out_dtype)
  return Spec(ratio=int(ratio), overlap=C == 2 * c, rope_freqs=freqs, eps=float(eps), out_dtype=dtype.name)
