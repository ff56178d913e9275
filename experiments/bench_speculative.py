"""Plain vs MTP speculative decoding through the engine: tokens/s, acceptance rate, identical outputs.

  python experiments/bench_speculative.py --checkpoint runs/tiny/hf [--slots 1 4] [--max-tokens 128]

Greedy requests (prompts: the first lines of a few standard-library modules), both backends warmed up on the same
requests first (compiles), then timed alternately (`--repeats` runs each; median and best); tokens/s = generated
tokens / wall time of the run (prefill included). Speculative decoding must reproduce the plain tokens exactly.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from dsv4_jax.serve.cached_backend import CachedBackend  # noqa: E402
from dsv4_jax.serve.engine import Engine  # noqa: E402
from dsv4_jax.serve.params import SamplingParams  # noqa: E402
from dsv4_jax.serve.speculative import SpecStats, SpeculativeBackend  # noqa: E402
from dsv4_jax.tokenizer import Tokenizer  # noqa: E402
from dsv4_jax.weights import load_pretrained  # noqa: E402

MODULES = ("json", "argparse", "inspect", "os", "time", "sys")


def prompts(tok, n: int, chars: int = 200) -> list[list[int]]:
  import importlib
  out = []
  for name in MODULES[:n]:
    src = inspect.getsource(importlib.import_module(name))
    out.append([tok.bos_id] + tok.encode(src[:chars]))
  return out


def run(engine, ids, max_tokens):
  hs = [engine.submit(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in ids]
  t0 = time.perf_counter()
  engine.run_until_idle()
  dt = time.perf_counter() - t0
  return [h.result().token_ids for h in hs], dt


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--slots", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--max-tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  tok = Tokenizer.load(args.checkpoint)
  model, _ = load_pretrained(args.checkpoint, dtype="float32", progress=False)
  rows = []
  for slots in args.slots:
    ids = prompts(tok, slots)
    max_len = max(map(len, ids)) + args.max_tokens + 2
    engines, res = {}, {}
    for name, make in (("plain", CachedBackend), ("speculative", SpeculativeBackend)):
      engines[name] = Engine(make(model, slots, max_len, kv_format="float32", bucket=64), tok)
      res[name] = dict(out=run(engines[name], ids, args.max_tokens)[0], times=[])  # warm-up (compiles)
    for _ in range(args.repeats):  # alternate, so that both see the same load on a shared machine
      for name, engine in engines.items():
        if name == "speculative":
          engine.backend.stats = SpecStats()
        out, dt = run(engine, ids, args.max_tokens)
        assert out == res[name]["out"]
        res[name]["times"].append(dt)
    for r in res.values():
      r["tok_s"] = slots * args.max_tokens / sorted(r["times"])[len(r["times"]) // 2]
      r["best_tok_s"] = slots * args.max_tokens / min(r["times"])
    res["speculative"]["stats"] = engines["speculative"].stats
    same = res["plain"]["out"] == res["speculative"]["out"]
    st = res["speculative"]["stats"]
    row = dict(slots=slots, max_tokens=args.max_tokens, plain_tok_s=round(res["plain"]["tok_s"], 1),
               spec_tok_s=round(res["speculative"]["tok_s"], 1),
               speedup=round(res["speculative"]["tok_s"] / res["plain"]["tok_s"], 3),
               plain_best_tok_s=round(res["plain"]["best_tok_s"], 1),
               spec_best_tok_s=round(res["speculative"]["best_tok_s"], 1),
               acceptance=round(st.acceptance_rate, 4), tokens_per_step=round(st.tokens_per_step, 3),
               identical=same)
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(f"# jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs", file=sys.stderr)


if __name__ == "__main__":
  main()
