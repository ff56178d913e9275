"""The decode top-k without a sort (pallas_kernels.indexer_topk.select) against lax.top_k (top_visible) on the
device: the same entries for every row, and the time of each at decode shapes (one CSA layer's index scores
of 64 queries over 8K / 32K / 256K entries = 32K / 128K / 1M tokens of context). Writes
experiments/results/select_top_k.md (+ .json).

  python experiments/check_select_top_k.py            # H200
  python experiments/check_select_top_k.py --small    # any machine: tiny shapes (a check of the script)

On an NVIDIA GPU lax.top_k of these rows is a CUB segmented radix sort (a custom call outside the CUDA graphs,
copying its segment offsets from the host each run); the select is compare-and-count passes, two triangular
matmuls of prefix sums and one scatter.
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

from experiments import timing  # noqa: E402
from pallas_kernels.indexer_topk.reference import top_visible  # noqa: E402
from pallas_kernels.indexer_topk.select import select_top_k  # noqa: E402


def case(key, rows, n, visible_frac=0.97):
  """Scores like the indexer's (relu-weighted sums: many near zero, a few ties) and a causal-like visibility."""
  k1, k2 = jax.random.split(key)
  s = jax.nn.relu(jax.random.normal(k1, (1, rows, n), jnp.float32)) * 3.0
  s = jnp.round(s * 256) / 256  # coarse values: ties at the k-th score are common
  end = (jax.random.uniform(k2, (1, rows, 1)) * (1 - visible_frac) + visible_frac) * n
  return s, jnp.arange(n)[None, None, :] < end


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--k", type=int, default=512)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = ap.parse_args(argv)
  shapes = [(4, 600)] if args.small else [(64, 8192), (64, 32768), (64, 262144)]
  k = min(args.k, 64) if args.small else args.k
  dev = jax.devices()[0]
  rows_out = []
  for rows, n in shapes:
    s, vis = case(jax.random.key(n), rows, n)
    want = jax.jit(lambda s, v: top_visible(s, v, k)[0])
    fns = {"lax.top_k (top_visible)": want}
    for bits in (2, 4, 8):
      fns[f"select_top_k, {bits} bits/pass"] = jax.jit(lambda s, v, b=bits: select_top_k(s, v, k, b))
    ref = np.sort(np.asarray(want(s, vis)), -1)
    rec = dict(rows=rows, n=n, k=k, times={}, same={})
    for name, fn in fns.items():
      got = np.sort(np.asarray(fn(s, vis)), -1)
      rec["same"][name] = bool((got == ref).all())
      rec["times"][name] = timing.median_time(fn, s, vis, steps=args.steps, warmup=3)
      print(f"{rows} x {n}: {name}: {rec['times'][name] * 1e6:.1f} us, same entries: {rec['same'][name]}",
            flush=True)
    rows_out.append(rec)
  r = dict(date=datetime.date.today().isoformat(), device=dev.device_kind, platform=dev.platform,
           jax=jax.__version__, python=platform.python_version(), rows=rows_out, small=args.small)
  lines = [f"# Decode top-k without a sort ({r['date']})\n",
           f"Machine: {r['device']} ({r['platform']}); jax {r['jax']}; Python {r['python']}."
           + (" `--small`: tiny shapes, a check of the script, not a measurement." if args.small else ""),
           f"\nRows of index scores (relu-like, rounded to 1/256 so ties are common; ~97% visible), k = {k}; "
           f"median of {args.steps} runs each, jitted alone. 'same' = the same entries as lax.top_k for every "
           "row.\n", "| rows × entries | implementation | µs | same |", "|---|---|---|---|"]
  for rec in rows_out:
    for name, t in rec["times"].items():
      lines.append(f"| {rec['rows']} × {rec['n']:,} | {name} | {t * 1e6:.1f} | {'yes' if rec['same'][name] else 'NO'} |")
  lines.append("\nReproduce: `python experiments/check_select_top_k.py" + (" --small" if args.small else "") + "`.")
  os.makedirs(args.out, exist_ok=True)
  name = "select_top_k_small" if args.small else "select_top_k"
  with open(os.path.join(args.out, name + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(args.out, name + ".json"), "w") as f:
    json.dump(r, f, indent=1)
  print("\n".join(lines))
  return 0 if all(all(rec["same"].values()) for rec in rows_out) else 1


if __name__ == "__main__":
  sys.exit(main())
