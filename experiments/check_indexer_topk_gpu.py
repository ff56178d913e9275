"""H200 check of the indexer's Mosaic GPU score kernel (pallas_kernels/indexer_topk/gpu.py) and of the op's GPU
path (kernel scores + the reference's selection), against the reference, then their speed.

  python experiments/check_indexer_topk_gpu.py            # on the H200 (a few minutes)

1. Scores: `index_scores_gpu` against the float32 reference scores at Flash / Pro-like head shapes (H 64 / 128,
   D 128) and odd ones (H 8, D 64; H 128, D 256): max abs error over max |score|.
2. Selection: `indexer_topk(..., implementation="gpu")` against the reference at S = 2048, m = 4, top-512,
   causal with a document start: the fraction of identical indices and the max score difference.
3. Speed (Flash CSA: H 64, D 128, m 4, top-512, causal; S = 8K, 32K, 128K): the op's forward with
   implementation "gpu" and "reference", median of synced runs; the kernel's useful TFLOP/s (2·H·D per visible
   (query, entry) pair).
"""

from __future__ import annotations

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
from pallas_kernels.indexer_topk import causal_visible_end, gpu  # noqa: E402
from pallas_kernels.indexer_topk.reference import index_scores, indexer_topk_reference  # noqa: E402
from timing import median_time  # noqa: E402


def _inputs(B, S, H, D, N, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (B, S, H, D), jnp.float32).astype(jnp.bfloat16),
          jax.random.normal(k[1], (B, N, D), jnp.float32).astype(jnp.bfloat16),
          jax.random.normal(k[2], (B, S, H), jnp.float32))


def check_scores(B, C, H, D, N):
  q, k, w = _inputs(B, C, H, D, N)
  got = np.asarray(gpu.index_scores_gpu(q, k, w, jnp.full((B, C), N, jnp.int32)))
  want = np.asarray(index_scores(q.astype(jnp.float32), k.astype(jnp.float32), w))
  print(f"SCORES B{B} C{C} H{H} D{D} N{N}: max abs err / max |I| = {np.abs(got - want).max() / np.abs(want).max():.2e}",
        flush=True)


def check_selection(S=2048, H=64, D=128, m=4, topk=512):
  q, k, w = _inputs(1, S, H, D, S // m)
  end = causal_visible_end(jnp.arange(S)[None], m)
  start = jnp.where(jnp.arange(S)[None] >= S // 2, S // 2 // m, 0).astype(jnp.int32)
  gi, gv = pallas_kernels.indexer_topk(q, k, w, end, visible_start=start, topk=topk, implementation="gpu")
  wi, wv = indexer_topk_reference(q, k, w, start, end, topk=topk)
  fin = np.isfinite(np.asarray(wv))
  same_mask = np.array_equal(np.isfinite(np.asarray(gv)), fin)
  dv = np.abs(np.asarray(gv)[fin] - np.asarray(wv)[fin]).max() / np.abs(np.asarray(wv)[fin]).max()
  print(f"SELECTION S{S} top-{topk}: indices identical {np.mean(np.asarray(gi) == np.asarray(wi)):.4%}, "
        f"-1 pattern identical {same_mask}, max score diff / max |score| {dv:.2e}", flush=True)


def speed(S, H=64, D=128, m=4, topk=512):
  q, k, w = _inputs(1, S, H, D, S // m)
  end = causal_visible_end(jnp.arange(S)[None], m)
  pairs = float(jnp.sum(end))
  row = []
  for impl in ("gpu", "reference") if S <= 32768 else ("gpu",):  # the reference at 128K: thousands of chunks
    f = jax.jit(functools.partial(pallas_kernels.indexer_topk, topk=topk, implementation=impl))
    t = median_time(f, q, k, w, end, steps=3)
    row.append(f"{impl} {t * 1e3:.2f} ms ({2 * H * D * pairs / t / 1e12:.1f} TFLOP/s useful)")
  scores = jax.jit(gpu.index_scores_gpu)
  chunk = min(S, gpu.SCORE_BUDGET // (S // m))
  t = median_time(scores, q[:, :chunk], k, w[:, :chunk], end[:, :chunk], steps=3)
  row.append(f"scores of one {chunk}-query chunk {t * 1e3:.2f} ms")
  print(f"SPEED S{S}: " + " | ".join(row), flush=True)


def main() -> int:
  if jax.default_backend() != "gpu":
    raise SystemExit(f"needs an NVIDIA Hopper GPU; this backend is {jax.default_backend()!r}")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
  t0 = time.time()
  for case in [(1, 16, 64, 128, 2048), (2, 5, 8, 64, 100), (1, 3, 128, 256, 700), (1, 64, 128, 128, 4096)]:
    try:
      check_scores(*case)
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  try:
    check_selection()
  except Exception:  # noqa: BLE001
    traceback.print_exc()
  for S in (8192, 32768, 131072):
    try:
      speed(S)
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  print(f"total {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
