"""H200 check of the sparse-attention backward kernel (pallas_kernels/sparse_attention/gpu_bwd.py): correctness
against the float32 reference, then what bounds its speed.

  python experiments/check_sparse_attention_gpu_bwd.py             # on the H200 (about 3 minutes)
  python experiments/check_sparse_attention_gpu_bwd.py --no-probe  # correctness only

1. dq and dkv of the kernel (reduction widths 2 and 4) and of the XLA bf16 backward against the float32 reference
   backward (vjp.reference_bwd) at shapes covering Flash / Pro heads, padded heads and dims, every index -1,
   indices crowded into few rows; relative errors (Frobenius norms).
2. jax.grad through `pallas_kernels.sparse_attention(..., implementation="gpu")` (forward kernel, custom_vjp,
   backward kernel) against the float32 reference op: dq, dkv, dsink; one case has B·S over the 65535 grid cap.
3. Probe (Flash and Pro at S = 8K, bench_kernels' CSA indices): the kernel with 2- and 4-wide reductions, with the
   reductions switched off (a timing probe only: dkv stays zero), and the same with indices scattered over all
   rows (no rows shared by neighbouring queries); median of 5 synced runs, useful TFLOP/s (bench_kernels' count)
   and float32 reductions per second.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pallas_kernels  # noqa: E402
from bench_kernels import csa_inputs  # noqa: E402
from pallas_kernels.sparse_attention import gpu_bwd, vjp  # noqa: E402
from pallas_kernels.sparse_attention.gpu import sparse_attention_gpu  # noqa: E402
from pallas_kernels.sparse_attention.reference import sparse_attention_reference  # noqa: E402
from timing import median_time  # noqa: E402

CASES = [(2, 37, 8, 128, 50, 40, "random"), (1, 64, 64, 512, 1024, 640, "random"),
         (1, 32, 128, 512, 2048, 1024, "random"), (1, 16, 64, 512, 4096, 640, "crowded"),
         (1, 8, 64, 512, 512, 200, "none"), (2, 20, 16, 192, 300, 70, "random")]
GRAD_CASES = [(2, 40000, 8, 128, 64, 32), (1, 64, 64, 512, 1024, 640), (1, 32, 128, 512, 2048, 1024)]


def _f32(x):
  return x.astype(jnp.float32)


def _rel(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def inputs(B, S, H, D, T, K, pattern="random", seed=0):
  """bf16 q, kv, dout; sink; indices: distinct per query, 15% -1 ("crowded": all from the first 2K rows; "none": all -1)."""
  k = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(k[0], (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
  kv = jax.random.normal(k[1], (B, T, D), jnp.float32).astype(jnp.bfloat16)
  sink = jax.random.normal(k[2], (H,), jnp.float32)
  rows = min(T, 2 * K) if pattern == "crowded" else T
  idx = jnp.argsort(jax.random.uniform(k[3], (B, S, rows)), axis=-1)[..., :K].astype(jnp.int32)
  idx = jnp.where(jax.random.bernoulli(k[4], 0.15, idx.shape), -1, idx)
  if pattern == "none":
    idx = jnp.full_like(idx, -1)
  dout = jax.random.normal(k[5], (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
  return q, kv, sink, idx, dout


def check_backward(B, S, H, D, T, K, pattern):
  scale = D ** -0.5
  q, kv, sink, idx, dout = inputs(B, S, H, D, T, K, pattern)
  out, lse = sparse_attention_reference(q, kv, sink, idx, scale=scale)
  delta = jnp.einsum("BSHD,BSHD->BSH", _f32(dout), _f32(out))
  want = vjp.reference_bwd(_f32(q), _f32(kv), idx, _f32(dout), lse, delta, scale=scale)
  runs = {f"kernel w{w}": gpu_bwd.sparse_attention_gpu_bwd(q, kv, idx, dout, lse, delta, scale=scale, reduce_width=w)
          for w in (2, 4)}
  runs["xla bf16"] = vjp.xla_gpu_bwd(q, kv, idx, dout, lse, delta, scale=scale)
  parts = [f"{name}: dq {_rel(g[0], want[0]):.2e} dkv {_rel(g[1], want[1]):.2e}"
           f"{'' if np.isfinite(np.asarray(g[1])).all() else ' NOT FINITE'}" for name, g in runs.items()]
  print(f"BWD B{B} S{S} H{H} D{D} T{T} K{K} {pattern}: " + " | ".join(parts), flush=True)


def check_grads(B, S, H, D, T, K):
  scale = D ** -0.5
  q, kv, sink, idx, _ = inputs(B, S, H, D, T, K)
  ct = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)

  def grads(impl, q, kv):
    def loss(q, kv, sink):
      o, lse = pallas_kernels.sparse_attention(q, kv, sink, idx, scale=scale, implementation=impl)
      return jnp.sum(_f32(o) * ct) + jnp.sum(jnp.sin(lse))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, sink)

  got, want = grads("gpu", q, kv), grads("reference", _f32(q), _f32(kv))
  rel = [_rel(g, w) for g, w in zip(got, want)]
  print(f"GRAD B{B} S{S} H{H} D{D} T{T} K{K}: dq {rel[0]:.2e} dkv {rel[1]:.2e} dsink {rel[2]:.2e}", flush=True)


def _scattered(S, T, K, seed=1):
  """[1, S, K] distinct rows per query from a random start with a prime stride: no window shared by neighbours."""
  off = jax.random.randint(jax.random.key(seed), (S, 1), 0, 1 << 30)
  return ((off + jnp.arange(K)[None, :] * 7919) % T).astype(jnp.int32)[None]


def probe(name, S, H, topk):
  D = 512
  scale = D ** -0.5
  q, kv, sink, idx = csa_inputs(S, H, topk)
  out, lse = sparse_attention_gpu(q, kv, sink, idx, scale=scale)
  dout = jax.random.normal(jax.random.key(3), out.shape, jnp.float32).astype(jnp.bfloat16)
  delta = jax.jit(lambda o, d: jnp.einsum("BSHD,BSHD->BSH", d, o, preferred_element_type=jnp.float32))(out, dout)
  flops = 4 * H * D * (128 + topk) * S * 2.5
  scattered = _scattered(S, kv.shape[1], idx.shape[-1])
  for label, ids, width in (("CSA indices, 2-wide", idx, 2), ("CSA indices, 4-wide", idx, 4),
                            ("CSA indices, reductions off", idx, 0), ("scattered, 4-wide", scattered, 4),
                            ("scattered, reductions off", scattered, 0)):
    f = jax.jit(functools.partial(gpu_bwd.sparse_attention_gpu_bwd, scale=scale, reduce_width=width))
    t = median_time(f, q, kv, ids, dout, lse, delta, steps=5)
    floats = S * ids.shape[-1] * D * (-(-H // 64))
    rate = "" if width == 0 else f", {floats / t / 1e9:.0f} G float32 reductions/s"
    print(f"PROBE {name} S={S} {label}: {t * 1e3:.2f} ms, {flops / t / 1e12:.1f} TFLOP/s{rate}", flush=True)


def _reductions_off():
  """Width 0 = no dkv reductions (the probe's timing case); other widths as the kernel has them."""
  real = gpu_bwd._reduce_rows

  def patched(n_kv, dp, chunk, width):
    return (lambda g, dkv, idx: None) if width == 0 else real(n_kv, dp, chunk, width)

  gpu_bwd._reduce_rows = patched


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--no-probe", action="store_true", help="correctness only")
  args = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    raise SystemExit("needs an NVIDIA Hopper GPU (the Mosaic GPU kernels); this backend is "
                     f"{jax.default_backend()!r}")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
  t0 = time.time()
  for case in CASES:
    try:
      check_backward(*case)
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  for case in GRAD_CASES:
    try:
      check_grads(*case)
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  if not args.no_probe:
    _reductions_off()
    for case in (("Flash", 8192, 64, 512), ("Pro", 8192, 128, 1024)):
      try:
        probe(*case)
      except Exception:  # noqa: BLE001
        traceback.print_exc()
  print(f"total {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
