"""One launch of each named Mosaic GPU kernel inside a profiler window, for Nsight Compute's hardware counters.

  ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
      python experiments/profile_kernels.py fwd bwd compress indexer        # on the H200

Each kernel runs once outside the window (compiles, warms the caches), then once between cuProfilerStart and
cuProfilerStop, so `--profile-from-start off` profiles that launch and the few XLA kernels around it. Shapes are
bench_kernels.py's: sparse attention Flash (H 64, D 512, window 128 + top-512) at --seq (default 8192) for `fwd`
and `bwd`; compression Flash CSA (c 512, m 4, overlap) at 4·--seq; the indexer's score kernel on one chunk of
the Flash indexer (H 64, d 128, m 4) at 4·--seq. Without ncu it just runs them (a smoke test).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import compress_inputs, csa_inputs, indexer_inputs  # noqa: E402
from pallas_kernels.compress.gpu import compress_gpu  # noqa: E402
from pallas_kernels.compress.reference import Spec  # noqa: E402
from pallas_kernels.indexer_topk import gpu as indexer_gpu  # noqa: E402
from pallas_kernels.sparse_attention.gpu import sparse_attention_gpu  # noqa: E402
from pallas_kernels.sparse_attention.gpu_bwd import sparse_attention_gpu_bwd  # noqa: E402


def _attention(S):
  q, kv, sink, idx = csa_inputs(S, 64, 512)
  return q, kv, sink, idx, q.shape[-1] ** -0.5


def case_fwd(S):
  q, kv, sink, idx, scale = _attention(S)
  return jax.jit(functools.partial(sparse_attention_gpu, scale=scale)), (q, kv, sink, idx)


def case_bwd(S):
  q, kv, sink, idx, scale = _attention(S)
  out, lse = jax.jit(functools.partial(sparse_attention_gpu, scale=scale))(q, kv, sink, idx)
  dout = jax.random.normal(jax.random.key(3), out.shape, jnp.float32).astype(out.dtype)
  delta = jnp.einsum("BSHD,BSHD->BSH", dout, out, preferred_element_type=jnp.float32)
  return jax.jit(functools.partial(sparse_attention_gpu_bwd, scale=scale)), (q, kv, idx, dout, lse, delta)


def case_compress(S):
  kv, score, ape, w, end, has_prev, positions, freqs = compress_inputs(S)
  spec = Spec(ratio=4, overlap=True, rope_freqs=tuple(freqs), eps=1e-6, out_dtype="bfloat16")
  f = jax.jit(lambda kv, score: compress_gpu(kv, score, ape, w, end, has_prev, positions, spec))
  return f, (kv, score)


def case_indexer(S, m=4):
  q, k, w, end = indexer_inputs(S, m=m)
  chunk = min(S, indexer_gpu.SCORE_BUDGET // (S // m), indexer_gpu.MAX_ROWS)  # the op's last query chunk
  return jax.jit(indexer_gpu.index_scores_gpu), (q[:, -chunk:], k, w[:, -chunk:], end[:, -chunk:])


CASES = {"fwd": (case_fwd, 1), "bwd": (case_bwd, 1), "compress": (case_compress, 4), "indexer": (case_indexer, 4)}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("kernels", nargs="+", choices=sorted(CASES))
  ap.add_argument("--seq", type=int, default=8192)
  args = ap.parse_args()
  cuda = ctypes.CDLL("libcuda.so.1")
  for name in args.kernels:
    build, seq_mult = CASES[name]
    fn, inputs = build(args.seq * seq_mult)
    jax.block_until_ready(fn(*inputs))  # compile and warm, outside the window
    jax.block_until_ready(inputs)
    print(f"== {name} (S {args.seq * seq_mult}): profiled launch follows", flush=True)
    cuda.cuProfilerStart()
    jax.block_until_ready(fn(*inputs))
    cuda.cuProfilerStop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
