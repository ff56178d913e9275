"""The paged FP4 index-score kernel on the GPU: equal to its reference, and its time against the XLA path it
replaces in a decode step and against the HBM floor (packed keys read once). Writes
experiments/results/paged_index_scores.md (+ .json).

  python experiments/check_paged_index_scores.py            # H200: decode shapes up to 128K context x 64
  python experiments/check_paged_index_scores.py --small    # any machine: tiny shapes, the reference only

The XLA path (what decode ran before the kernel): gather each row's packed keys from the pages, decode them to
bf16, score (pallas_kernels.indexer_topk.reference.index_scores: [B, S, H, N] float32 logits, relu, weighted
head sum). Both are followed by the same top-k in a decode step; that is not timed here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import reporting, timing  # noqa: E402
from pallas_kernels import paged_index_scores  # noqa: E402
from pallas_kernels.paged_index_scores import fp4  # noqa: E402
from pallas_kernels.paged_index_scores.reference import paged_index_scores_reference  # noqa: E402


def make_case(key, B, S, H, context, page_tokens=256, d=128):
  """Random packed keys of B sequences of `context` tokens (one CSA layer's indexer keys, m = 4), pages
  shuffled in the pool; q in bf16, w float32."""
  K = page_tokens // 4
  P = -(-context // page_tokens)
  ks = jax.random.split(key, 5)
  codes = jax.random.randint(ks[0], (B * P, K, d // 2), 0, 256).astype(jnp.uint8)
  scales = jax.random.randint(ks[1], (B * P, K, d // 32), 120, 132).astype(jnp.uint8)
  pages = jnp.concatenate([codes, scales], axis=-1)
  table = jax.random.permutation(ks[2], B * P).reshape(B, P).astype(jnp.int32)
  q = jax.random.normal(ks[3], (B, S, H, d), jnp.bfloat16)
  w = jax.random.normal(ks[4], (B, S, H), jnp.float32) * 0.1
  return q, w, pages, table


def paged_index_scores_tiles():
  from pallas_kernels.paged_index_scores import gpu  # noqa: PLC0415
  return gpu.TILES


def bytes_read(q, w, pages, table):
  """Bytes the op must move at least: each row's packed keys once, q, w, the table, the scores written."""
  B, S, H, d = q.shape
  N = table.shape[1] * pages.shape[1]
  return B * N * fp4.row_bytes(d) + q.size * 2 + w.size * 4 + table.size * 4 + B * S * N * 4


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny shapes, reference only (a CPU check of the script)")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = ap.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  cases = [(2, 1, 64, 2048)] if args.small else [(1, 1, 64, 8192), (64, 1, 64, 8192), (1, 1, 64, 131072),
                                                 (64, 1, 64, 131072), (64, 2, 64, 131072)]
  bw = timing.copy_bandwidth(jnp.zeros((1 << 28 if on_gpu else 1 << 20,), jnp.bfloat16))
  xla = jax.jit(paged_index_scores_reference)
  kernel = jax.jit(lambda *a: paged_index_scores(*a, implementation="gpu")) if on_gpu else None
  rows = []
  for B, S, H, context in cases:
    case = make_case(jax.random.key(context + B + S), B, S, H, context)
    want = np.asarray(xla(*case))
    row = dict(batch=B, queries=S, heads=H, context=context, keys=case[3].shape[1] * case[2].shape[1],
               floor_ms=bytes_read(*case) / bw * 1e3, xla_ms=timing.median_time(xla, *case, steps=args.steps) * 1e3)
    if kernel is not None:
      got = np.asarray(kernel(*case))
      row["max_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
      row["top512_same"] = float(np.mean([
          np.array_equal(np.sort(np.argsort(-g)[:512]), np.sort(np.argsort(-r)[:512]))
          for g, r in zip(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]))]))
      row["kernel_ms"] = timing.median_time(kernel, *case, steps=args.steps) * 1e3
    rows.append(row)
    print(row, flush=True)
  sweep = []
  if on_gpu:  # tiles of 64 keys per CTA, at the largest case
    from pallas_kernels.paged_index_scores import gpu  # noqa: PLC0415
    for tiles in (2, 4, 8, 16):
      t = timing.median_time(jax.jit(lambda *a, t=tiles: gpu.paged_index_scores_gpu(*a, tiles=t)), *case,
                             steps=args.steps)
      sweep.append(dict(tiles=tiles, kernel_ms=t * 1e3))
      print(sweep[-1], flush=True)

  dev = jax.devices()[0]
  head = (f"# Paged FP4 index scores ({datetime.date.today()})\n\nMachine: 1 × {dev.device_kind}; jax "
          f"{jax.__version__}; Python {platform.python_version()}. Copy bandwidth measured in the same run: "
          f"{bw / 1e9:,.0f} GB/s.\n\nOne CSA layer's indexer scores over every cached key of each row (d 128, "
          f"page_tokens 256 = 64 keys a page, pages shuffled in the pool); median of {args.steps} synced runs. "
          "XLA path: gather + decode to bf16 + score ([B,S,H,N] float32 logits), as decode ran before. Kernel: "
          "pallas_kernels/paged_index_scores/gpu.py. Floor: packed keys + q + w + table read once, scores "
          "written, at the copy bandwidth.\n\n")
  cols = ["batch", "queries", "context", "keys", "xla_ms", "kernel_ms", "floor_ms", "max_rel_err", "top512_same"]
  lines = ["| " + " | ".join(cols + ["kernel / floor", "XLA / kernel"]) + " |", "|" + "---|" * (len(cols) + 2)]
  for r in rows:
    cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
    ratio = [f"{r['kernel_ms'] / r['floor_ms']:.2f}×", f"{r['xla_ms'] / r['kernel_ms']:.1f}×"] if "kernel_ms" in r else ["", ""]
    lines.append("| " + " | ".join(cells + ratio) + " |")
  cmd = "python " + " ".join(["experiments/check_paged_index_scores.py"] + reporting.without_options(sys.argv[1:] if argv is None else argv))
  text = head + "\n".join(lines)
  if sweep:
    B, S, _, context = cases[-1]
    text += (f"\n\nTiles of 64 keys per CTA (default {paged_index_scores_tiles()}), at batch {B} × {S} queries, "
             f"context {context:,}: " + ", ".join(f"{r['tiles']}: {r['kernel_ms']:.3f} ms" for r in sweep))
  text += f"\n\nReproduce: `{cmd}`\n"
  print(text)
  if not args.small:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "paged_index_scores.md"), "w") as f:
      f.write(text)
    with open(os.path.join(args.out, "paged_index_scores.json"), "w") as f:
      json.dump(dict(rows=rows, tiles_sweep=sweep, bandwidth=bw, device=dev.device_kind, jax=jax.__version__), f, indent=1)


if __name__ == "__main__":
  main()
