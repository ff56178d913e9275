"""The indexer's per-chunk top-k on the GPU: lax.top_k (a sort) against radix select (radix_select.py).

  python experiments/bench_indexer_select.py            # on the H200 (about two minutes)

1. Selection alone on one chunk of causal Flash-indexer scores (random float32, entry s visible to query t
   iff s < (t+1)/4): [8192 queries, 8192 entries] (the S = 32K chunk) and [2048, 32768] (S = 128K): whether
   radix select's indices and scores equal top_k's, and the device time of each (radix with 1, 2 and 4 bits a
   round).
2. The whole op, `indexer_topk(..., implementation="gpu")` with selection "sort" and "radix" (gpu.RADIX_BITS
   bits a round), at S = 8K, 32K and 128K (Flash: H 64, d 128, m 4, top-512): device time and whether the
   indices are equal.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import indexer_inputs  # noqa: E402
from pallas_kernels.indexer_topk import causal_visible_end, gpu  # noqa: E402
from pallas_kernels.indexer_topk.radix_select import radix_top_visible  # noqa: E402
from pallas_kernels.indexer_topk.reference import top_visible  # noqa: E402
from timing import device_time  # noqa: E402

TOPK = 512


def selection_alone(C, N, S):
  scores = jax.random.normal(jax.random.key(0), (1, C, N), jnp.float32)
  end = causal_visible_end(jnp.arange(S - C, S)[None], 4)
  visible = jnp.arange(N)[None, None, :] < end[..., None]
  sort = jax.jit(functools.partial(top_visible, k=TOPK))
  want = sort(scores, visible)
  t = device_time(sort, scores, visible)
  row = [f"sort {t * 1e3:.2f} ms"]
  for bits in (1, 2, 4):
    radix = jax.jit(functools.partial(radix_top_visible, k=TOPK, bits=bits))
    got = radix(scores, visible)
    same = bool(jnp.array_equal(got[0], want[0]) & jnp.array_equal(got[1], want[1]))
    t = device_time(radix, scores, visible)
    row.append(f"radix/{bits} {t * 1e3:.2f} ms ({'equal' if same else 'DIFFERENT'})")
  print(f"SELECT [{C} x {N}]: " + " | ".join(row), flush=True)


def whole_op(S):
  q, k, w, end = indexer_inputs(S)
  start = jnp.zeros_like(end)
  row, picks = [], {}
  for selection in ("sort", "radix"):
    f = jax.jit(functools.partial(gpu.indexer_topk_gpu, topk=TOPK, selection=selection))
    picks[selection] = f(q, k, w, start, end)
    t = device_time(f, q, k, w, start, end, steps=3)
    row.append(f"{selection} {t * 1e3:.2f} ms")
  same = bool(jnp.array_equal(picks["sort"][0], picks["radix"][0]))
  print(f"OP S{S}: " + " | ".join(row) + f" | indices equal {same}", flush=True)


def main() -> int:
  if jax.default_backend() != "gpu":
    raise SystemExit(f"needs an NVIDIA Hopper GPU; this backend is {jax.default_backend()!r}")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
  t0 = time.time()
  selection_alone(8192, 8192, 32768)
  selection_alone(2048, 32768, 131072)
  for S in (8192, 32768, 131072):
    whole_op(S)
  print(f"total {time.time() - t0:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
