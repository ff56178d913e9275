"""Quick Instruction time to first token: a task forked from the cached conversation vs re-prefilling it.

  python experiments/bench_quick_instruction.py                         # CPU: tiny model, 1K / 4K / 16K tokens
  python experiments/bench_quick_instruction.py --model flash-small --lengths 1024 4096 16384   # GPU (H200)

For each conversation length L (random token ids; the answers' content does not matter here, only the work):
  * shared prefix: the conversation sits in a parent slot of the engine's CachedBackend; a task forks it
    (serve.cache.fork_slot: state rows copied, full pages shared, the last page copied), appends its task suffix
    (1 token; `action` 3) and takes the argmax of the first answer token. TTFT = fork + that extend + argmax.
  * re-prefill: the whole prompt, conversation + suffix, prefilled into a fresh slot (what a separate request
    costs) and the argmax of its first token.
Both for one task and for the 5 tasks of a new user turn together (title, domain, query, authority, action):
forked in parallel (one batched extend) against 5 separate prefills one after the other (as the engine admits
requests). Compilation is excluded (one warm-up per shape); each figure is the median of --reps runs, every
run ending with the result on the host. Writes a markdown table (--out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model.transformer import DeepSeekV4  # noqa: E402
from dsv4_jax.serve.cached_backend import CachedBackend  # noqa: E402

TASK_SUFFIX_LEN = {"title": 1, "domain": 1, "query": 1, "authority": 1, "action": 3}  # tokens appended


def bench_config(name: str, max_len: int) -> ModelConfig:
  if name == "tiny":  # d 64, 4 layers (SWA, CSA, HCA, CSA), window 16, top-8: the CPU check
    return ModelConfig.preset("tiny", num_nextn_predict_layers=0, compress_ratios=(0, 4, 128, 4),
                              max_position_embeddings=max(max_len, 4096))
  if name == "flash-small":  # Flash widths (d 4096, head_dim 512, window 128, top-512), 4 layers, 16 experts
    return ModelConfig.preset(
        "flash", num_hidden_layers=4, compress_ratios=(0, 4, 128, 4), num_hash_layers=1, n_routed_experts=16,
        num_nextn_predict_layers=0, expert_dtype=None, weight_quant=None, simulate_quant=False, dtype="bfloat16",
        param_dtype="bfloat16")
  raise SystemExit(f"unknown --model {name!r}: tiny | flash-small")


def median_time(fn, reps: int) -> float:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_length(backend: CachedBackend, L: int, vocab: int, reps: int, rng) -> dict:
  tasks = list(TASK_SUFFIX_LEN)
  parent, forks, fresh = 0, list(range(1, 1 + len(tasks))), 1 + len(tasks)
  prefix = rng.integers(16, vocab, L).tolist()  # past the special-token ids
  suffix = {t: rng.integers(16, vocab, k).tolist() for t, k in TASK_SUFFIX_LEN.items()}

  t = time.perf_counter()
  np.asarray(backend.prefill(parent, prefix))  # the conversation, cached once (includes its compile)
  first_prefill_s = time.perf_counter() - t

  def shared(n):
    def run():
      for slot in forks[:n]:
        backend.fork(parent, slot)
      np.argmax(np.asarray(backend.extend(forks[:n], [suffix[x] for x in tasks[:n]])), axis=-1)
      for slot in forks[:n]:  # not timed in a real run; here inside, so it is counted against the fork
        backend.release(slot)
    return run

  def reprefill(n):
    def run():
      for x in tasks[:n]:
        np.argmax(np.asarray(backend.prefill(fresh, prefix + suffix[x])))
        backend.release(fresh)
    return run

  row = {"L": L, "first_prefill_s": first_prefill_s}
  row["shared_1"] = median_time(shared(1), reps)
  row["reprefill_1"] = median_time(reprefill(1), reps)
  row["shared_n"] = median_time(shared(len(tasks)), reps)
  row["reprefill_n"] = median_time(reprefill(len(tasks)), max(1, reps // 2))
  backend.release(parent)
  assert int(backend.cache.num_free) == backend.cache.num_pages, "pages leaked"
  return row


def write_report(path: str, rows: list[dict], cfg: ModelConfig, args, kv_format: str) -> str:
  dev = jax.devices()[0]
  n = len(TASK_SUFFIX_LEN)
  ms = lambda s: f"{s * 1e3:.1f}"
  header = (f"| conversation tokens | first prefill (s, with compile) | re-prefill, 1 task (ms) "
            f"| shared prefix, 1 task (ms) | speed-up | re-prefill, {n} tasks one by one (ms) "
            f"| shared prefix, {n} tasks in parallel (ms) | speed-up |")
  lines = [
      f"# Quick Instruction: TTFT with the shared prefix vs re-prefilling ({datetime.date.today()})", "",
      (f"Machine: {dev.platform} ({dev.device_kind}), {platform.processor() or platform.machine()}; "
       f"jax {jax.__version__}; Python {platform.python_version()}."),
      (f"Model: `--model {args.model}` (random weights): d={cfg.hidden_size}, {cfg.num_hidden_layers} layers "
       f"(ratios {cfg.compress_ratios}), window {cfg.sliding_window}, top-{cfg.index_topk}, {cfg.n_routed_experts} "
       f"experts, {cfg.dtype}; cache entries {kv_format}, 256-token pages; CachedBackend (prefill bucket 64)."),
      ("TTFT = until the first answer token's argmax is on the host; shared prefix = fork(s) + one batched extend "
       "of the task suffix(es) (+ releasing the forks); re-prefill = prefill of conversation + suffix into a fresh "
       f"slot. Median of {args.reps} runs after a warm-up (no compile). {n} tasks = {', '.join(TASK_SUFFIX_LEN)} "
       "(suffix 1 token each, action 3)."), "",
      header, "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['L']} | {r['first_prefill_s']:.1f} | {ms(r['reprefill_1'])} | {ms(r['shared_1'])} | "
                 f"{r['reprefill_1'] / r['shared_1']:.1f}× | {ms(r['reprefill_n'])} | {ms(r['shared_n'])} | "
                 f"{r['reprefill_n'] / r['shared_n']:.1f}× |")
  lines += ["", (f"Reproduce: `python experiments/bench_quick_instruction.py --model {args.model} --lengths "
                 f"{' '.join(map(str, args.lengths))} --reps {args.reps}`."), ""]
  text = "\n".join(lines)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="tiny", help="tiny (CPU) | flash-small (GPU)")
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quick_instruction.md"))
  args = p.parse_args(argv)
  max_len = max(args.lengths) + 64
  cfg = bench_config(args.model, max_len)
  model = DeepSeekV4(cfg, rngs=nnx.Rngs(0))
  backend = CachedBackend(model, 2 + len(TASK_SUFFIX_LEN), max_len)
  kv_format = backend.cache.kv_format
  rng = np.random.default_rng(0)
  rows = []
  for L in args.lengths:
    rows.append(bench_length(backend, L, cfg.vocab_size, args.reps, rng))
    r = rows[-1]
    print(f"L={L}: re-prefill {r['reprefill_1'] * 1e3:.1f} ms, shared {r['shared_1'] * 1e3:.1f} ms (1 task); "
          f"{r['reprefill_n'] * 1e3:.1f} vs {r['shared_n'] * 1e3:.1f} ms ({len(TASK_SUFFIX_LEN)} tasks)", flush=True)
  print(write_report(args.out, rows, cfg, args, kv_format))
  return 0


if __name__ == "__main__":
  sys.exit(main())
