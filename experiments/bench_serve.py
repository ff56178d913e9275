"""Serving speed of a Flash-shaped model on one accelerator: decode step against the HBM floor, prefill
throughput, and the KV cache's size per sequence.

  python experiments/bench_serve.py [--out experiments/results]     # the H200 run (~7-9 min, mostly compiles)
  JAX_PLATFORMS=cpu python experiments/bench_serve.py --small        # tiny shapes: checks the script on a CPU

Phases, in order, each adding to serve.md / serve.json as it finishes (a run cut short keeps its tables):
copy bandwidth and matmul rate; cache sizes; decode at each (context, batch); the serving engine's step at the
longest context and largest batch (experiments/engine_timing.py: dispatch-ahead; waiting too with
--engine-waiting); prefill; the pieces of a decode step timed alone (one layer's MoE on each expert path, the
head); decode at the longest context and largest batch once more with the capacity-path MoE when the serving
steps run another path there.

Model (`bench_config`): DeepSeek-V4-Flash with every per-layer dimension kept (d 4096, 64 heads × 512, 64-dim
RoPE, q/o LoRA 1024, 8 output groups, window 128, CSA m = 4 with a 64 × 128 indexer and top-512, HCA m = 128,
mHC × 4, experts of width 2048, top-6 + 1 shared, vocab 129,280), reduced to 6 layers (SWA, CSA, HCA, CSA,
HCA, CSA: Flash's schedule with its first SWA layer, then the CSA/HCA alternation; 1 hash-routed layer) and
32 routed experts, no MTP; bf16 weights and compute, no QAT simulation; head matmul in bf16 with float32
accumulation (`fp32_matmuls=False`); cache entries in the spec §8.1 FP8 layout (584 B entries, 68 B indexer
keys). Routed experts: the path the serving steps run (`dsv4_jax.serve.backend.serving_model` switches the
model to moe_impl "exact": the capacity einsums with C = tokens for steps of at most
`moe.EXACT_CAPACITY_MAX_TOKENS` tokens (decode; `moe.exact_uses_capacity`), the exact `ragged_dot` for longer ones; without
it, the capacity path with C = tokens, which drops nothing).

Decode uses the real serving steps (`dsv4_jax.serve.steps.make_decode` over `model.decode`, cache donated).
To reach a long context at batch 64 without prefilling it, `fill_synthetic` writes a cache as if every slot
had been prefilled to the context: lengths, a page table holding each slot's pages, the free stack without
them, and random (validly packed) entries in the window rings, compressor tails and every page. The decode
step then reads exactly what it would after a real prefill. Timing (device/METHOD.md): compile + warm-up
steps, then each step timed alone with `block_until_ready`; the median is reported (also the mean over
back-to-back steps without a sync between them).

The floor: bytes a decode step must move through HBM / measured copy bandwidth (a large jnp copy, read +
written bytes). Bytes: every non-routed-expert weight once, the routed experts the batch touches (batch 1:
top-k = 6 per layer; batch B: min(E, B·k), an upper bound: at B = 64 all 32), the head; per sequence the
cache entries attended (window 128 in every layer; CSA: top-512 entries + all T/4 indexer keys scored; HCA:
all T/128 entries), the compressor tails amortised (read once per block), the logits written (float32).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv4_jax import accounting  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model import cache as cache_lib  # noqa: E402
from dsv4_jax.model import kv_format as kvf  # noqa: E402
from dsv4_jax.model.moe import EXACT_CAPACITY_MAX_TOKENS, MoE, exact_uses_capacity, moe_impl  # noqa: E402
from dsv4_jax.model.transformer import DeepSeekV4, layer_plan  # noqa: E402
from dsv4_jax.serve.cache import cache_bytes  # noqa: E402
from dsv4_jax.serve.steps import make_decode, make_prefill  # noqa: E402

import timing  # noqa: E402  (experiments/timing.py)
from engine_timing import engine_backend, time_engine  # noqa: E402
from reporting import without_options  # noqa: E402

GiB = 2 ** 30


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----- model ---------------------------------------------------------------------------------------------
def bench_config(small: bool, experts: int, capacity_factor: float | None = None,
                 attention_impl: str = "reference") -> ModelConfig:
  """The benchmark model (module docstring). capacity_factor None = exact (C = T: nothing dropped)."""
  if small:  # tiny: d 64, head_dim 128, window 16, top-8, 4 layers (SWA, CSA, HCA, CSA), 8 experts
    base = ModelConfig.preset("tiny", num_nextn_predict_layers=0, compress_ratios=(0, 4, 128, 4))
  else:
    base = ModelConfig.preset(
        "flash", num_hidden_layers=6, num_nextn_predict_layers=0, compress_ratios=(0, 4, 128, 4, 128, 4),
        num_hash_layers=1, n_routed_experts=experts)
  exact = base.n_routed_experts / base.num_experts_per_tok
  return base.replace(expert_dtype=None, weight_quant=None, simulate_quant=False, dtype="bfloat16",
                      param_dtype="bfloat16", moe_impl="capacity", fp32_matmuls=False,
                      moe_capacity_factor=exact if capacity_factor is None else capacity_factor,
                      attention_impl=attention_impl)


def served_moe_impl(model) -> str:
  """The moe_impl the serving steps run (dsv4_jax.serve switches the model to the exact "exact")."""
  try:
    from dsv4_jax.serve.backend import serving_model
  except ImportError:
    serving_model = lambda m: m
  return moe_impl(serving_model(model).cfg)


def step_moe_path(impl: str, tokens: int) -> str:
  """The expert path a step of `tokens` tokens runs under moe_impl `impl` ("exact": the capacity einsums with
  C = tokens where moe.exact_uses_capacity says so, else ragged)."""
  if impl == "exact":
    return "capacity" if exact_uses_capacity(tokens) else "ragged"
  return impl


def direct_decode(model):
  """model.decode jitted with the cache donated, on the model exactly as configured (make_decode's shape,
  without any switch of the MoE path): the capacity-path comparison."""
  graphdef, params = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("max_context",))
  def step(params, cache, tokens, max_context):
    return nnx.merge(graphdef, params).decode(tokens, cache, max_context=max_context)

  return lambda tokens, cache, max_context=None: step(params, cache, tokens, max_context=max_context)


# ----- synthetic long-context cache ----------------------------------------------------------------------
def _random_rows(key, lead_shape, pack, width: int, pool: int = 4096):
  """Storage rows [*lead_shape, E]: `pool` random normal vectors packed once, then drawn at random."""
  k1, k2 = jax.random.split(key)
  rows = pack(jax.random.normal(k1, (pool, width), jnp.float32))
  return rows[jax.random.randint(k2, lead_shape, 0, pool)]


def time_engine_modes(model, cfg, batch: int, context: int, steps: int, warmup: int, kv_format: str,
                      modes=(True,)):
  """Yields (dispatch_ahead, timings) of the serving engine's step at context × batch on a synthetic cache, for
  each mode (True: dispatch-ahead, False: waiting); one backend, sized for the timed steps past the context."""
  max_len = context + 256 * -(-(2 * steps + warmup + 8) // 256)
  backend = engine_backend(model, batch, max_len, kv_format)

  def fill(_):
    return fill_synthetic(model.init_cache(batch, max_len, kv_format=kv_format), cfg, context, seed=context + batch)

  for ahead in modes:
    yield ahead, time_engine(backend, fill, context, steps, warmup, dispatch_ahead=ahead)


def fill_synthetic(cache: cache_lib.InferenceCache, cfg: ModelConfig, length: int, seed: int = 0):
  """`cache` (fresh from init_cache) as if every slot had been prefilled with `length` tokens.

  The cache's current length is `lengths[b]`; the entries of tokens [j·T, (j+1)·T) of slot b live in page
  `page_table[b, j]`, popped from its page shard's free stack by `cache.allocate_pages` (as a prefill would),
  and every window ring, compressor tail and page holds random entries packed in the cache's format (pages of
  all slots, used or not).
  """
  B, T = cache.batch, cache.page_tokens
  table, free_pages, num_free, overflow = cache_lib.allocate_pages(  # from each slot's page shard, as prefill does
      cache, cache.page_table, jnp.full((B,), length, jnp.int32))
  if length > cache.max_len or bool(overflow):
    raise ValueError(f"fill_synthetic: {length} tokens × {B} slots do not fit (max_len {cache.max_len}, "
                     f"{cache.num_pages} pages of {T} in {cache.page_shards} shard(s))")
  fmt, c, rd = cache.kv_format, cfg.head_dim, cfg.qk_rope_head_dim
  entry = lambda k, lead: _random_rows(k, lead, lambda x: kvf.pack_entries(x, rd, fmt), c)
  index_key = lambda k, lead: _random_rows(k, lead, lambda x: kvf.pack_keys(x, fmt), cfg.index_head_dim)
  keys = iter(jax.random.split(jax.random.key(seed), 1024))

  def tail(st):
    if st is None:
      return None
    return cache_lib.CompressorState(jax.random.normal(next(keys), st.kv.shape, jnp.float32),
                                     jax.random.normal(next(keys), st.score.shape, jnp.float32))

  states = tuple(tuple(cache_lib.LayerState(window=entry(next(keys), st.window.shape[:-1]),
                                            compressor=tail(st.compressor),
                                            index_compressor=tail(st.index_compressor))
                       for st in stack) for stack in cache.states)
  pools = tuple(tuple(cache_lib.LayerPool(
      entries=None if pl.entries is None else entry(next(keys), pl.entries.shape[:-1]),
      index_keys=None if pl.index_keys is None else index_key(next(keys), pl.index_keys.shape[:-1]))
      for pl in stack) for stack in cache.pools)
  return cache.replace(lengths=jnp.full((B,), length, jnp.int32), page_table=table, free_pages=free_pages,
                       num_free=num_free, overflow=overflow, states=states, pools=pools)


# ----- floors --------------------------------------------------------------------------------------------
def decode_bytes(cfg: ModelConfig, batch: int, context: int, fmt: str, param_bytes: int = 2) -> dict:
  """Bytes one decode step must move (module docstring), by part."""
  counts = accounting.count_params(cfg)
  E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  touched = min(E, batch * k)
  weights = (counts.head + counts.final + batch * cfg.hidden_size) * param_bytes
  for lp in counts.layers:
    weights += (lp.total - lp.routed_experts + lp.routed_experts * touched // E) * param_bytes
  entry, key = accounting.kv_entry_bytes(cfg, fmt), accounting.indexer_key_bytes(cfg, fmt)
  per_seq = 0.0
  for r in cfg.main_ratios:
    per_seq += (min(context, cfg.sliding_window) + 1) * entry  # window read + the new entry written
    if r == 4:
      per_seq += min(cfg.index_topk, context // 4) * entry + (context // 4) * key
      per_seq += 2 * 4 * 4 * (cfg.head_dim + cfg.index_head_dim)  # tails [2m, 2c] kv + score, 1/m per step
    elif r == 128:
      per_seq += (context // 128) * entry + 2 * 4 * cfg.head_dim
  logits = batch * cfg.vocab_size * 4
  return dict(weights=weights, cache=per_seq * batch, logits=logits, total=weights + per_seq * batch + logits,
              experts_touched=touched)


def decode_flops(cfg: ModelConfig, batch: int, context: int) -> float:
  """Useful FLOPs of a decode step: active matmuls, attention over the attended keys, indexer scoring."""
  counts = accounting.count_params(cfg)
  f = 2.0 * counts.active
  for r in cfg.main_ratios:
    keys = min(context, cfg.sliding_window)
    if r == 4:
      keys += min(cfg.index_topk, context // 4)
      f += 2 * cfg.index_n_heads * cfg.index_head_dim * (context // 4)
    elif r == 128:
      keys += context // 128
    f += 4 * cfg.num_attention_heads * cfg.head_dim * keys
  return f * batch


# ----- timing (copy bandwidth, matmul rate and plain medians: experiments/timing.py) ---------------------
def time_decode(decode, cache, batch: int, vocab: int, steps: int, warmup: int, max_context: int):
  """(median step s, mean back-to-back step s, compile+first step s, cache). The cache is donated each step."""
  tokens = jnp.asarray(np.random.default_rng(batch).integers(2, vocab, (batch, 1)), jnp.int32)
  t = time.perf_counter()
  logits, cache = decode(tokens, cache, max_context=max_context)
  jax.block_until_ready((logits, cache.lengths))
  first = time.perf_counter() - t
  for _ in range(warmup):
    logits, cache = decode(tokens, cache, max_context=max_context)
    jax.block_until_ready((logits, cache.lengths))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    logits, cache = decode(tokens, cache, max_context=max_context)
    jax.block_until_ready((logits, cache.lengths))
    times.append(time.perf_counter() - t)
  t = time.perf_counter()
  for _ in range(steps):
    logits, cache = decode(tokens, cache, max_context=max_context)
  jax.block_until_ready((logits, cache.lengths))
  pipelined = (time.perf_counter() - t) / steps
  if not bool(jnp.all(jnp.isfinite(logits))) or bool(cache.overflow):
    raise RuntimeError(f"decode produced non-finite logits or overflowed the cache (batch {batch})")
  return statistics.median(times), pipelined, first, cache


def time_prefill(model, cfg, prompt: int, chunk: int, runs: int, fmt: str):
  """(median seconds to prefill one `prompt`-token sequence in chunks of `chunk`, compile+first run s)."""
  prefill = make_prefill(model)
  tokens = jnp.asarray(np.random.default_rng(prompt).integers(2, cfg.vocab_size, (1, prompt)), jnp.int32)
  chunks = [tokens[:, s:s + chunk] for s in range(0, prompt, chunk)]
  if prompt % chunk:
    raise ValueError(f"prompt {prompt} must be a multiple of the chunk {chunk}")

  def run():
    cache = model.init_cache(1, prompt, kv_format=fmt)
    jax.block_until_ready(cache.lengths)
    t = time.perf_counter()
    for c in chunks:
      logits, cache = prefill(c, cache, max_context=prompt)
    jax.block_until_ready((logits, cache.lengths))
    dt = time.perf_counter() - t
    if not bool(jnp.all(jnp.isfinite(logits[:, -1]))) or bool(cache.overflow):
      raise RuntimeError("prefill produced non-finite logits or overflowed the cache")
    return dt

  first = run()
  return statistics.median(run() for _ in range(runs)), first


def time_parts(model, cfg, batch: int, steps: int) -> list[tuple[str, float]]:
  """(part, seconds) of one decode step's pieces timed alone: one layer's MoE under each expert path, the head."""
  rng = np.random.default_rng(1)
  x = jax.random.normal(jax.random.key(2), (batch, 1, cfg.hidden_size), jnp.bfloat16)
  tok = jnp.asarray(rng.integers(2, cfg.vocab_size, (batch, 1)), jnp.int32)
  rows = []
  variants = [("capacity, exact (C = tokens)", dict(moe_impl="capacity")),
              ("capacity, factor 1.25 (drops)", dict(moe_impl="capacity", moe_capacity_factor=1.25)),
              ("ragged_dot", dict(moe_impl="ragged"))]
  for name, change in variants:
    moe = MoE(cfg.replace(**change), hash_routed=False, rngs=nnx.Rngs(3))
    g, p = nnx.split(moe)
    f = jax.jit(lambda p, x, t: nnx.merge(g, p)(x, t)[0])
    rows.append((f"MoE of one layer (router + {cfg.n_routed_experts} experts, {name} + shared)",
                 timing.median_time(f, p, x, tok, steps=steps, warmup=2)))
    del moe, p
  g, p = nnx.split(model)
  h = jax.random.normal(jax.random.key(4), (batch, 1, cfg.hc_mult, cfg.hidden_size), jnp.bfloat16)
  head = jax.jit(lambda p, h: (lambda m: m.logits(m.norm(m.hc_head(h))))(nnx.merge(g, p)))
  rows.append(("head (hc head + norm + d→V logits)", timing.median_time(head, p, h, steps=steps, warmup=2)))
  return rows


# ----- cache sizes ---------------------------------------------------------------------------------------
def cache_sizes(cfgs: dict[str, ModelConfig], contexts: list[int], fmt: str) -> list[dict]:
  """Per-sequence bytes of init_cache(1, L) (shapes via jax.eval_shape: the same code, no arrays) against
  accounting.kv_cache (what `dsv4 info` prints)."""
  rows = []
  for name, cfg in cfgs.items():
    plan = tuple(layer_plan(cfg))
    for L in contexts:
      shapes = jax.eval_shape(lambda: cache_lib.init_cache(cfg, plan, 1, L, kv_format=fmt))
      got = cache_bytes(shapes)
      want = accounting.kv_cache(cfg, L, fmt)
      rows.append(dict(model=name, context=L, allocated=got.total, accounting=want.total,
                       compressor_state=got.compressor_state, window=got.window, compressed=got.compressed,
                       indexer=got.indexer))
  return rows


# ----- report --------------------------------------------------------------------------------------------
def fmt_ctx(n: int) -> str:
  return f"{n // 1048576}M" if n % 1048576 == 0 else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


def write_report(path: str, r: dict) -> str:
  cfg = r["cfg"]
  L = []
  add = L.append
  title = "Serving throughput" + (" — CPU `--small` smoke run (tiny shapes; not an H200 measurement)"
                                  if r["small"] else "")
  add(f"# {title} ({r['date']})\n")
  if r["small"]:
    add("This file is the CPU check of the script (`--small`: tiny preset, contexts and batches scaled down, on a "
        "shared 2-core CPU); its timings and verdict say nothing about serving speed. The H200 run "
        "(`python experiments/bench_serve.py`) replaces it.\n")
  add(f"Machine: {r['device']}; jax {r['jax']}, jaxlib {r['jaxlib']}, flax {r['flax']}; Python {r['python']}. "
      f"Measured copy bandwidth (read + write, {r['copy_gib']:.3g} GiB random bf16): {r['bw'] / 1e9:,.0f} GB/s; "
      f"bf16 matmul ({r['mm_n']}³): {r['mm'] / 1e12:.3g} TFLOP/s.\n")
  add(f"Model: `experiments/bench_serve.py:bench_config`{' --small (tiny preset)' if r['small'] else ''}: "
      f"d {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({r['schedule']}; {cfg.num_hash_layers} hash-routed), "
      f"{cfg.num_attention_heads} heads × {cfg.head_dim}, window {cfg.sliding_window}, CSA m = 4 "
      f"(indexer {cfg.index_n_heads} × {cfg.index_head_dim}, top-{cfg.index_topk}), HCA m = 128, "
      f"{cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} (width {cfg.moe_intermediate_size}) "
      f"+ {cfg.n_shared_experts} shared, vocab {cfg.vocab_size:,}, no MTP; {r['params'] / 1e9:.4g}B parameters "
      f"in bf16 ({r['params'] * 2 / GiB:.3g} GiB), bf16 compute, no QAT simulation, head matmul in bf16 "
      f"(fp32 accumulation); KV cache in the `{r['fmt']}` layout; routed experts in decode and prefill: "
      f"`{r['served_moe']}` (the path `dsv4_jax.serve.steps` runs; 'capacity' here means C = tokens, nothing "
      f"dropped" + (f"; `exact`: capacity for steps of ≤ {EXACT_CAPACITY_MAX_TOKENS} tokens, i.e. decode, "
                    f"ragged_dot for longer ones, i.e. prefill chunks" if r['served_moe'] == "exact" else "")
      + "). Attention: "
      f"`{cfg.attention_impl}` (pallas_kernels.sparse_attention; with a kernel implementation the fp8 indexer "
      f"scores run pallas_kernels.paged_index_scores' GPU kernel). Layers: "
      + ("one parameter set per layer (`scan_layers=False`, `--no-scan`: what `dsv4 generate/serve` load)"
         if not cfg.scan_layers else "scanned stacks (`scan_layers=True`)") + ".\n")
  add(f"Long contexts are synthetic (`fill_synthetic`): the cache is written as if each slot held the context "
      f"(lengths, page table, random packed entries in every ring, tail and page), then real decode steps run "
      f"on it. Step = median of {r['steps']} steps each synced, after compile and {r['warmup']} warm-up steps; "
      f"'back-to-back' = mean of {r['steps']} steps with one sync at the end.\n")

  add("## Decode\n")
  add("| context | batch | step (ms) | back-to-back (ms) | tokens/s | HBM floor (ms) | step / floor | "
      "bandwidth used | weights GiB (experts touched/layer) | cache GiB read | compute floor (ms) | compile (s) |")
  add("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for d in r.get("decode", []):
    add(f"| {fmt_ctx(d['context'])} | {d['batch']} | {d['step_s'] * 1e3:.2f} | {d['pipelined_s'] * 1e3:.2f} | "
        f"{d['batch'] / d['step_s']:,.0f} | {d['floor_s'] * 1e3:.3f} | {d['step_s'] / d['floor_s']:.2f}× | "
        f"{d['floor_s'] / d['step_s']:.0%} | {d['bytes']['weights'] / GiB:.2f} ({d['bytes']['experts_touched']}) | "
        f"{d['bytes']['cache'] / GiB:.3f} | {d['flops'] / r['mm'] * 1e3:.3f} | {d['first_s']:.0f} |")
  if r.get("decode_capacity"):
    d = r["decode_capacity"]
    add(f"| {fmt_ctx(d['context'])} | {d['batch']} capacity-path MoE | {d['step_s'] * 1e3:.2f} | "
        f"{d['pipelined_s'] * 1e3:.2f} | {d['batch'] / d['step_s']:,.0f} | {d['floor_s'] * 1e3:.3f} | "
        f"{d['step_s'] / d['floor_s']:.2f}× | {d['floor_s'] / d['step_s']:.0%} | "
        f"{d['bytes']['weights'] / GiB:.2f} ({d['bytes']['experts_touched']}) | {d['bytes']['cache'] / GiB:.3f} | "
        f"{d['flops'] / r['mm'] * 1e3:.3f} | {d['first_s']:.0f} |")
  add("\nHBM floor = (weights read + cache read + logits written) / measured copy bandwidth; 'bandwidth used' = "
      "floor / step (the fraction of the copy bandwidth the step would need if it moved only those bytes). "
      "Compute floor = useful FLOPs (active matmuls, attention over attended keys, indexer scoring) / measured "
      "bf16 matmul rate.\n")
  if r.get("parts"):
    add(f"Pieces of a decode step at batch {r['parts_batch']}, each timed alone (median of {r['steps']}):\n")
    add("| piece | ms | × per step | ms per step |")
    add("|---|---|---|---|")
    for name, s, mult in r["parts"]:
      add(f"| {name} | {s * 1e3:.3f} | {mult} | {s * mult * 1e3:.3f} |")
    add("")

  if r.get("engine"):
    add("## The serving engine's step\n")
    add("`dsv4_jax.serve.engine.Engine` over a `CachedBackend` (experiments/engine_timing.py): one streaming "
        "request per slot, greedy, every slot decoding at the context (synthetic cache); a step = one "
        "`engine.step()`: decode all slots, draw the tokens on the device, read them, stream text, check stops. "
        "Dispatch-ahead (the engine's default with this backend) dispatches a step before reading the previous "
        "step's tokens; 'waiting' (`--engine-waiting`) reads each step's tokens before the next "
        "(`Engine(..., dispatch_ahead=False)`). "
        f"Median (mean) of {r['steps']} steps after compile and {r['warmup']} warm-up steps. The tokenizer is a "
        "stub (one character per id), so the host's detokenizing costs less than with a real one.\n")
    add("| context | batch | mode | engine step (ms) | mean (ms) | tokens/s | HBM floor (ms) | step / floor |")
    add("|---|---|---|---|---|---|---|---|")
    for e in r["engine"]:
      add(f"| {fmt_ctx(e['context'])} | {e['batch']} | {'dispatch-ahead' if e['dispatch_ahead'] else 'waiting'} | "
          f"{e['step_s'] * 1e3:.2f} | {e['mean_s'] * 1e3:.2f} | {e['batch'] / e['step_s']:,.0f} | "
          f"{e['floor_s'] * 1e3:.3f} | {e['step_s'] / e['floor_s']:.2f}× |")
    add("")

  add("## Prefill (batch 1)\n")
  add("| prompt | chunk | time (s) | tokens/s | compile + first run (s) |")
  add("|---|---|---|---|---|")
  for p in r.get("prefill", []):
    add(f"| {fmt_ctx(p['prompt'])} | {fmt_ctx(p['chunk'])} | {p['s']:.3f} | {p['prompt'] / p['s']:,.0f} | "
        f"{p['first_s']:.0f} |")
  add("")

  add(f"## KV cache per sequence (`{r['fmt']}` layout)\n")
  add("| model | context | allocated by init_cache (GiB) | accounting / `dsv4 info` (GiB) | equal | "
      "+ compressor tails (MiB, fp32) |")
  add("|---|---|---|---|---|---|")
  for c in r.get("cache", []):
    add(f"| {c['model']} | {fmt_ctx(c['context'])} | {c['allocated'] / GiB:.4f} | {c['accounting'] / GiB:.4f} | "
        f"{'yes' if c['allocated'] == c['accounting'] else 'no'} | {c['compressor_state'] / 2 ** 20:.2f} |")
  if r.get("measured_cache"):
    m = r["measured_cache"]
    add(f"\nThe decode cache actually allocated at {fmt_ctx(m['context'])} × batch {m['batch']} "
        f"(max_len {m['max_len']}): {m['total'] / GiB:.3f} GiB = {m['total'] / m['batch'] / GiB:.4f} GiB per "
        f"slot (`cache_bytes` of the live arrays; page slack included).")
  add("")

  if r.get("errors"):
    add("## Cases that failed or were skipped\n")
    for e in r["errors"]:
      add(f"* {e}")
    add("")
  add("## Target: decode step ≤ 1.5× the HBM floor at the longest context, largest batch\n")
  add(verdict(r) if r.get("decode") else "(not measured: the run stopped before the decode cases)")
  add(f"\nReproduce: `{r['command']}`.")
  text = "\n".join(L) + "\n"
  with open(path, "w") as f:
    f.write(text)
  return text


def verdict(r: dict) -> str:
  d = max(r["decode"], key=lambda d: (d["context"], d["batch"]))
  ratio = d["step_s"] / d["floor_s"]
  lines = [f"At {fmt_ctx(d['context'])}, batch {d['batch']}: step {d['step_s'] * 1e3:.2f} ms against a floor of "
           f"{d['floor_s'] * 1e3:.2f} ms = {ratio:.2f}× — "
           + ("**met**." if ratio <= 1.5 else f"**missed** by {ratio / 1.5:.2f}× (the step would have to be "
                                               f"{d['step_s'] * 1e3 - 1.5 * d['floor_s'] * 1e3:.2f} ms shorter)."),
           f"The step uses {d['floor_s'] / d['step_s']:.0%} of the measured copy bandwidth for the bytes it must "
           f"move."]
  for e in r.get("engine", []):
    if e["dispatch_ahead"] and (e["context"], e["batch"]) == (d["context"], d["batch"]):
      er = e["step_s"] / e["floor_s"]
      lines.append(f"As the serving engine runs it (dispatch-ahead, {e['batch']} streaming requests): "
                   f"{e['step_s'] * 1e3:.2f} ms a step = {er:.2f}× the floor — "
                   + ("**met**." if er <= 1.5 else f"**missed** by {er / 1.5:.2f}×."))
  short = min((x for x in r["decode"] if x["batch"] == d["batch"]), key=lambda x: x["context"])
  if short is not d:
    lines.append(f"Context cost: the same batch at {fmt_ctx(short['context'])} steps in "
                 f"{short['step_s'] * 1e3:.2f} ms, {(d['step_s'] - short['step_s']) * 1e3:+.2f} ms going to "
                 f"{fmt_ctx(d['context'])} (the cache bytes to read grow by "
                 f"{(d['bytes']['cache'] - short['bytes']['cache']) / GiB:.3f} GiB ≈ "
                 f"{(d['bytes']['cache'] - short['bytes']['cache']) / r['bw'] * 1e3:.2f} ms at the copy rate).")
  if r.get("parts") and d["batch"] == r["parts_batch"]:
    key = "ragged" if step_moe_path(r["served_moe"], r["parts_batch"]) == "ragged" else "exact"
    moe = next(s * m for n, s, m in r["parts"] if key in n)
    head = next(s * m for n, s, m in r["parts"] if n.startswith("head"))
    rest = d["step_s"] - moe - head
    lines.append(f"Where the {d['step_s'] * 1e3:.2f} ms go (pieces timed alone at batch {r['parts_batch']}): MoE "
                 f"{moe * 1e3:.2f} ms over {r['cfg'].num_hidden_layers} layers, head {head * 1e3:.2f} ms, the rest "
                 f"(attention, indexer, compressors, cache reads/writes, mHC) ≈ {rest * 1e3:.2f} ms.")
  if r.get("decode_capacity"):
    c = r["decode_capacity"]
    lines.append(f"With the capacity-path MoE (C = tokens, exact) instead of `{r['served_moe']}`, the same step takes "
                 f"{c['step_s'] * 1e3:.2f} ms = {c['step_s'] / c['floor_s']:.2f}× the floor.")
  return "\n".join(lines)


# ----- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                  help="directory for serve.md and serve.json (default experiments/results)")
  ap.add_argument("--small", action="store_true", help="tiny shapes: a CPU check of the script (~3 min on 2 cores, mostly compiles)")
  ap.add_argument("--contexts", type=int, nargs="+", default=None, help="decode contexts (default 8192 131072)")
  ap.add_argument("--batches", type=int, nargs="+", default=None, help="decode batches (default 1 64)")
  ap.add_argument("--prefill", type=int, nargs="+", default=None, help="prompt lengths (default 8192 32768)")
  ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default 8192)")
  ap.add_argument("--experts", type=int, default=32)
  ap.add_argument("--kv-format", default="fp8", choices=kvf.KV_FORMATS)
  ap.add_argument("--attention-impl", default="reference", choices=("reference", "auto", "gpu"),
                  help="cfg.attention_impl (default: the presets' 'reference', what `dsv4 serve` runs on a "
                       "checkpoint; 'auto' takes the Mosaic GPU sparse-attention kernel on a GPU)")
  ap.add_argument("--no-scan", action="store_true",
                  help="one parameter set per layer (scan_layers=False: what `dsv4 generate/serve` load) instead "
                       "of scanned layer stacks")
  ap.add_argument("--steps", type=int, default=None, help="timed decode steps per case (default 20)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--no-parts", action="store_true", help="skip timing the pieces (MoE, head) alone")
  ap.add_argument("--no-prefill", action="store_true", help="skip the prefill timings")
  ap.add_argument("--time-budget", type=float, default=None,
                  help="seconds after which remaining cases are skipped (e.g. 480 inside a 600 s limit)")
  ap.add_argument("--no-engine", action="store_true",
                  help="skip timing the serving engine's step (continuous batching, dispatch-ahead)")
  ap.add_argument("--engine-waiting", action="store_true",
                  help="also time the engine waiting for each step (dispatch_ahead=False; ~1.5 min more on an H200)")
  ap.add_argument("--no-capacity-variant", action="store_true",
                  help="skip the extra decode case with the capacity-path MoE (run when serving uses another)")
  args = ap.parse_args(argv)
  small = args.small
  contexts = args.contexts or ([512, 2048] if small else [8192, 131072])
  batches = args.batches or ([1, 4] if small else [1, 64])
  prompts = args.prefill or ([256, 1024] if small else [8192, 32768])
  chunk = args.chunk or (256 if small else 8192)
  steps = args.steps or (5 if small else 20)
  fmt = args.kv_format
  os.makedirs(args.out, exist_ok=True)

  t_start = time.perf_counter()
  dev = jax.devices()[0]
  log(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  cfg = bench_config(small, args.experts, attention_impl=args.attention_impl)
  if args.no_scan:
    cfg = cfg.replace(scan_layers=False)
  r = dict(small=small, cfg=cfg, fmt=fmt, steps=steps, warmup=args.warmup, date=datetime.date.today().isoformat(),
           device=f"{jax.device_count()} × {dev.device_kind}" + (" (CPU)" if dev.platform == "cpu" else ""),
           jax=jax.__version__, jaxlib=jaxlib.__version__,
           flax=__import__("flax").__version__, python=platform.python_version(),
           schedule=", ".join({0: "SWA", 4: "CSA", 128: "HCA"}[x] for x in cfg.main_ratios),
           command=" ".join(["python experiments/bench_serve.py"]
                            + without_options(sys.argv[1:] if argv is None else argv)))

  copy_bytes = (64 << 20) if small else (2 << 30)  # 2^30 bf16 elements: well past L2 (60 MB), under int32 counts
  r["copy_gib"] = copy_bytes / GiB
  r["bw"] = timing.copy_bandwidth(jax.random.normal(jax.random.key(0), (copy_bytes // 2,), jnp.bfloat16))
  r["mm_n"] = 1024 if small else 8192
  r["mm"] = timing.matmul_rate(r["mm_n"])
  log(f"copy bandwidth {r['bw'] / 1e12:.3f} TB/s, bf16 matmul {r['mm'] / 1e12:.1f} TFLOP/s")

  t = time.perf_counter()
  model = DeepSeekV4(cfg, rngs=nnx.Rngs(0))
  jax.block_until_ready(nnx.state(model))
  r["params"] = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  r["served_moe"] = served_moe_impl(model)
  log(f"model: {r['params'] / 1e9:.3f}B params (accounting total {accounting.count_params(cfg).total / 1e9:.3f}B), "
      f"built in {time.perf_counter() - t:.0f} s; serving MoE path: {r['served_moe']}")

  path = os.path.join(args.out, "serve.md")

  def save(final: bool = False) -> None:
    """serve.md and serve.json with what is measured so far (a run cut short still leaves its tables)."""
    text = write_report(path, r)
    raw = {k: v for k, v in r.items() if k != "cfg"}
    raw["cfg"] = cfg.to_dict()
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
      json.dump(raw, f, indent=1, default=str)
    if final:
      print(text, flush=True)
    log(f"wrote {path}" + ("" if final else " (partial)"))

  flash = ModelConfig.preset("flash")
  r["cache"] = cache_sizes({"V4-Flash (43 layers)": flash, "this benchmark's model": cfg},
                           [131072, 1048576], fmt)

  r["errors"] = []

  def guarded(name: str, fn) -> None:
    """Run one case; a failure (e.g. out of memory) is recorded in the report and the run goes on. Past
    --time-budget seconds, cases are skipped (and listed) instead."""
    if args.time_budget and time.perf_counter() - t_start > args.time_budget:
      log(f"  skipped {name}: past the {args.time_budget} s budget")
      r["errors"].append(f"{name}: skipped (past --time-budget {args.time_budget} s)")
      save()
      return
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - one case must not cost the others
      msg = f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      log(f"  FAILED {msg}")
      r["errors"].append(msg)
    save()

  def decode_case(step_fn, ctx: int, B: int) -> dict:
    max_len = ctx + 256 * -(-(2 * steps + args.warmup + 2) // 256)
    log(f"  filling a {max_len}-token cache for {B} slots")
    cache = fill_synthetic(model.init_cache(B, max_len, kv_format=fmt), cfg, ctx, seed=ctx + B)
    jax.block_until_ready(cache)
    if ctx == max(contexts) and B == max(batches):
      r["measured_cache"] = dict(context=ctx, batch=B, max_len=max_len, total=cache_bytes(cache).total)
    step_s, pipe_s, first_s, cache = time_decode(step_fn, cache, B, cfg.vocab_size, steps, args.warmup,
                                                 max_context=max_len)
    del cache
    nb = decode_bytes(cfg, B, ctx, fmt)
    d = dict(context=ctx, batch=B, step_s=step_s, pipelined_s=pipe_s, first_s=first_s, bytes=nb,
             floor_s=nb["total"] / r["bw"], flops=decode_flops(cfg, B, ctx))
    log(f"  step {step_s * 1e3:.2f} ms (back-to-back {pipe_s * 1e3:.2f}), {B / step_s:,.0f} tok/s, floor "
        f"{d['floor_s'] * 1e3:.3f} ms -> {step_s / d['floor_s']:.2f}x; compile+first {first_s:.1f} s")
    return d

  # Decode at each (context, batch) on a synthetic cache, through make_decode.
  decode = make_decode(model)
  r["decode"] = []
  for ctx in contexts:
    for B in batches:
      log(f"decode: context {ctx}, batch {B}")
      guarded(f"decode {ctx} x {B}", lambda ctx=ctx, B=B, f=decode: r["decode"].append(decode_case(f, ctx, B)))
  del decode

  # The serving engine's step (continuous batching, streaming) at the longest context and largest batch.
  if not args.no_engine:
    ctx, B = max(contexts), max(batches)
    r["engine"] = []
    log(f"engine: context {ctx}, batch {B} streaming requests, dispatch-ahead"
        + (" and waiting" if args.engine_waiting else ""))

    def engine_cases() -> None:
      modes = (True, False) if args.engine_waiting else (True,)
      for ahead, e in time_engine_modes(model, cfg, B, ctx, steps, args.warmup, fmt, modes):
        e["floor_s"] = decode_bytes(cfg, B, ctx, fmt)["total"] / r["bw"]
        r["engine"].append(e)
        log(f"  {'dispatch-ahead' if ahead else 'waiting'}: engine step {e['step_s'] * 1e3:.2f} ms (mean "
            f"{e['mean_s'] * 1e3:.2f}) = {e['step_s'] / e['floor_s']:.2f}x the floor; compile+first "
            f"{e['first_s']:.1f} s")

    guarded("engine", engine_cases)


  # Prefill, batch 1, chunked, through make_prefill.
  if not args.no_prefill:
    r["prefill"] = []

    def prefill_case(P: int) -> None:
      c = min(chunk, P)
      s, first = time_prefill(model, cfg, P, c, runs=3, fmt=fmt)
      r["prefill"].append(dict(prompt=P, chunk=c, s=s, first_s=first))
      log(f"  {s:.3f} s, {P / s:,.0f} tok/s (compile + first {first:.1f} s)")

    for P in prompts:
      log(f"prefill: {P} tokens in chunks of {min(chunk, P)}")
      guarded(f"prefill {P}", lambda P=P: prefill_case(P))

  if not args.no_parts:
    B = max(batches)
    log(f"pieces at batch {B}: MoE variants, head")

    def parts() -> None:
      rows = [(n, s, cfg.num_hidden_layers if n.startswith("MoE") else 1) for n, s in time_parts(model, cfg, B, steps)]
      r["parts_batch"], r["parts"] = B, rows
      for n, s, m in rows:
        log(f"  {n}: {s * 1e3:.3f} ms × {m}")

    guarded("pieces", parts)

  ctx, B = max(contexts), max(batches)
  if step_moe_path(r["served_moe"], B) != "capacity" and not args.no_capacity_variant:
    log(f"decode, capacity-path MoE (C = tokens): context {ctx}, batch {B}")
    guarded("decode, capacity-path MoE",
            lambda: r.__setitem__("decode_capacity", decode_case(direct_decode(model), ctx, B)))

  r["wall_s"] = time.perf_counter() - t_start
  save(final=True)
  log(f"total {r['wall_s']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
