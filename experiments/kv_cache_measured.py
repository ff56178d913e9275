"""The serving cache really allocated for one sequence, against the KV accounting.

  python experiments/kv_cache_measured.py [--out experiments/results] [--contexts 131072 1048576 1000000]
                                          [--models flash pro] [--shapes-only]

Builds `dsv4_jax.model.cache.init_cache` (what `DeepSeekV4.init_cache` calls) for the Flash and Pro layer
schedules, batch 1, kv_format "fp8", arrays only (no model parameters), and compares the bytes of its arrays
with `accounting.kv_cache(cfg, context)`. A cache is allocated for real (and the process's resident memory
growth measured) when the machine has room for it; otherwise only its shapes are built (`jax.eval_shape`),
which gives the same byte counts without the memory. Writes kv_cache_measured.md and kv_cache_measured.png.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv4_jax import accounting  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model.cache import init_cache  # noqa: E402
from dsv4_jax.model.transformer import layer_plan  # noqa: E402
from reporting import context_label, save_figure  # noqa: E402  (experiments/reporting.py)

GiB, MiB = 2**30, 2**20
CONTEXTS = (131072, 1048576, 1000000)  # 128K, 1M (2^20), and 10^6 (not a whole number of pages)
MODELS = ("flash", "pro")
HEADROOM = 4 * GiB  # allocate for real only if this much memory stays available after it


def _mem_available() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0


def _rss() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def _nbytes(tree) -> int:
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def cache_parts(cache) -> dict[str, int]:
  """Bytes of each part of an InferenceCache (or of its eval_shape), read off the arrays themselves."""
  states = [st for stack in cache.states for st in stack]
  pools = [pl for stack in cache.pools for pl in stack]
  return {
    "window": _nbytes([st.window for st in states]),
    "compressed": _nbytes([pl.entries for pl in pools]),
    "indexer": _nbytes([pl.index_keys for pl in pools]),
    "compressor_state": _nbytes([(st.compressor, st.index_compressor) for st in states]),
    "metadata": _nbytes((cache.lengths, cache.page_table, cache.free_pages, cache.num_free, cache.overflow)),
  }


def measure(cfg: ModelConfig, context: int, allocate: bool | None = None) -> dict:
  """One row: the cache for one sequence of `context` tokens, allocated (if `allocate`, or None and it fits)
  or shape-only, next to the accounting. Gap = allocated KV - accounting, explained by page rounding."""
  plan = layer_plan(cfg)
  build = lambda: init_cache(cfg, plan, 1, context, kv_format="fp8")
  shapes = jax.eval_shape(build)
  need = sum(cache_parts(shapes).values())
  if allocate is None:
    allocate = _mem_available() > need + HEADROOM
  rss_growth = None
  if allocate:
    before = _rss()
    cache = jax.block_until_ready(build())
    rss_growth = _rss() - before
    parts = cache_parts(cache)
    leaves = sum(a.nbytes for a in jax.tree.leaves(cache))  # what the runtime reports for its buffers
    del cache
  else:
    parts = cache_parts(shapes)
    leaves = None
  acc = accounting.kv_cache(cfg, context)
  page_tokens = shapes.page_tokens
  pages = -(-context // page_tokens)  # what one sequence needs; the cache's own count is `num_pages`
  kv = parts["window"] + parts["compressed"] + parts["indexer"]
  # Page rounding: whole pages of page_tokens tokens' entries; the accounting holds floor(context / m) entries.
  padded = accounting.kv_cache(cfg, pages * page_tokens)
  return {
    "model": cfg, "context": context, "mode": "allocated" if allocate else "eval_shape", "parts": parts,
    "kv_allocated": kv, "all_allocated": sum(parts.values()), "buffer_nbytes": leaves, "rss_growth": rss_growth,
    "accounting": {"window": acc.window, "compressed": acc.compressed, "indexer": acc.indexer,
                   "compressor_state": acc.compressor_state},
    "kv_accounting": acc.total, "gap": kv - acc.total, "page_tokens": page_tokens, "pages": pages,
    "num_pages": shapes.num_pages,
    "padding_tokens": pages * page_tokens - context,
    "page_rounding": (padded.compressed + padded.indexer) - (acc.compressed + acc.indexer),
  }


def write_markdown(path: str, rows: list[dict], names: list[str]) -> None:
  today = datetime.date.today().isoformat()
  L = [f"# Serving KV cache: allocated vs accounting ({today})", "",
       f"`python experiments/kv_cache_measured.py` on {platform.machine()} CPU, jax {jax.__version__}. The cache "
       "is `dsv4_jax.model.cache.init_cache(cfg, layer_plan(cfg), batch=1, max_len=context, kv_format=\"fp8\")`, "
       "the arrays `DeepSeekV4.init_cache` allocates (no parameters). *allocated*: built for real, bytes summed "
       "over its buffers (`Array.nbytes`) and the process's resident-memory growth recorded; *eval_shape*: "
       "shapes only (same byte count, no memory). Accounting: `accounting.kv_cache(cfg, context)` (spec §8.3).",
       "", "| model | context | how | window | compressed | indexer keys | **KV allocated** | **KV accounting** | "
       "gap | compressor state | metadata | all buffers (nbytes) | RSS growth |", "|---" * 13 + "|"]
  for r, n in zip(rows, names):
    p = r["parts"]
    mib = lambda b: f"{b / MiB:,.2f}"
    rss = "-" if r["rss_growth"] is None else mib(r["rss_growth"])
    buffers = "-" if r["buffer_nbytes"] is None else mib(r["buffer_nbytes"])
    L.append(f"| {n} | {context_label(r['context'])} | {r['mode']} | {mib(p['window'])} | {mib(p['compressed'])} | "
             f"{mib(p['indexer'])} | **{mib(r['kv_allocated'])}** | **{mib(r['kv_accounting'])}** | "
             f"{r['gap']:+,} B | {mib(p['compressor_state'])} | {p['metadata']:,} B | {buffers} | {rss} |")
  L += ["", "All sizes in MiB unless marked B. \"KV\" = window + compressed + indexer keys, as the accounting.", "",
        "## The gap, part by part", "",
        "* **Window ring**: min(128, context) rows of 584 B per layer, one per slot: equal to the accounting's "
        "window term by construction (the ring holds exactly the window; nothing is rounded).",
        "* **Compressed entries and indexer keys (pages)**: the pool has ceil(context / page_tokens) pages of "
        f"{rows[0]['page_tokens']} tokens; a page holds page_tokens/4 CSA entries + as many 68-B indexer keys "
        "and page_tokens/128 HCA entries per layer. When the context is a whole number of pages (128K, 1M = 2^20) "
        "this is exactly floor(context / m) entries and the gap is 0 B. At 10^6 tokens the last page is "
        "partly used: the gap equals the accounting of the padding tokens (column `page rounding` below), and "
        "nothing else.",
        "* **Compressor state** (not KV, reported apart as the accounting does): per CSA layer the float32 "
        "kv + score tails [2·4, 2·512] of the main compressor and [2·4, 2·128] of the indexer's, per HCA layer "
        "[128, 512]; a fixed size per sequence, independent of context ("
        + ", ".join(sorted({f"{n} {r['parts']['compressor_state'] / MiB:.2f} MiB" for r, n in zip(rows, names)}))
        + "), equal to the accounting's `compressor_state`.",
        "* **Metadata**: lengths, page table, free-page stack (int32): 8 B per page plus a few words.", "",
        "| model | context | pages x tokens | padding tokens | page rounding (B) | gap - page rounding |",
        "|---|---|---|---|---|---|"]
  for r, n in zip(rows, names):
    L.append(f"| {n} | {context_label(r['context'])} | {r['pages']} x {r['page_tokens']} | {r['padding_tokens']} | "
             f"{r['page_rounding']:,} | {r['gap'] - r['page_rounding']:,} |")
  L += ["", "*all buffers (nbytes)*: the sum of `Array.nbytes` over every buffer of the allocated cache (KV + "
        "compressor state + metadata), as the runtime reports it. *RSS growth*: the resident memory the process "
        "gained while building the cache (after a warm-up build, so jax's first-use allocations stay out): the "
        "buffers are written (zeros, -inf) when created, so it tracks the allocated bytes to within a percent; "
        "it can fall a little short when the allocator reuses memory freed by the previous row.", "",
        "Plot: [kv_cache_measured.png](kv_cache_measured.png).",
        ""]
  with open(path, "w") as f:
    f.write("\n".join(L))


def plot(path: str, rows: list[dict], names: list[str]) -> str:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  contexts = sorted({r["context"] for r in rows}, key=lambda c: (c % 1024 != 0, c))
  fig, axes = plt.subplots(1, len(contexts), figsize=(4 * len(contexts), 4.5), squeeze=False)
  colors = {"window": "tab:blue", "compressed": "tab:orange", "indexer": "tab:green",
            "compressor_state": "tab:gray"}
  for ax, ctx in zip(axes[0], contexts):
    labels, x = [], 0
    for r, n in zip(rows, names):
      if r["context"] != ctx:
        continue
      for kind, parts in (("accounting", r["accounting"]), (r["mode"], r["parts"])):
        bottom = 0.0
        for part, color in colors.items():
          v = parts[part] / GiB
          ax.bar(x, v, bottom=bottom, color=color, label=part.replace("_", " ") if not labels else None,
                 hatch="//" if kind == "accounting" else None, edgecolor="k", lw=0.5)
          bottom += v
        ax.annotate(f"{bottom:.3f}", (x, bottom), ha="center", va="bottom", fontsize=8)
        labels.append(f"{n}\n{kind}")
        x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(f"context {context_label(ctx)} tokens, one sequence")
    ax.set_ylabel("KV + compressor state per sequence (GiB)")
    ax.grid(True, axis="y", alpha=0.3)
  axes[0][0].legend(fontsize=8, loc="upper left")
  fig.suptitle("Serving cache, fp8 format: accounting (hatched) vs the arrays init_cache allocates; labels = totals")
  return save_figure(fig, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
  p.add_argument("--models", nargs="+", default=list(MODELS))
  p.add_argument("--shapes-only", action="store_true", help="never allocate (jax.eval_shape only)")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows, names = [], []
  for name in args.models:
    cfg = ModelConfig.preset(name)
    if not args.shapes_only:  # warm-up: jax's own first-use allocations stay out of the RSS growth
      jax.block_until_ready(init_cache(cfg, layer_plan(cfg), 1, 256, kv_format="fp8"))
    for ctx in args.contexts:
      r = measure(cfg, ctx, allocate=False if args.shapes_only else None)
      rows.append(r)
      names.append({"flash": "V4-Flash", "pro": "V4-Pro"}.get(name, name))
      print(f"{names[-1]} {context_label(ctx)} ({r['mode']}): KV {r['kv_allocated']:,} B allocated, "
            f"{r['kv_accounting']:,} B accounting, gap {r['gap']:+,} B (page rounding {r['page_rounding']:,} B); "
            f"compressor state {r['parts']['compressor_state']:,} B; RSS growth {r['rss_growth']}", flush=True)
  write_markdown(os.path.join(args.out, "kv_cache_measured.md"), rows, names)
  print("wrote", os.path.join(args.out, "kv_cache_measured.md"),
        plot(os.path.join(args.out, "kv_cache_measured.png"), rows, names))
  return 0


if __name__ == "__main__":
  sys.exit(main())
