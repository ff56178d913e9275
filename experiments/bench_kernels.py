"""Kernel benchmark (H200): gather-sparse attention and compression against their references, dense attention
and the measured ceilings. Prints a markdown report and writes it to OUT/kernels.md.

  python experiments/bench_kernels.py [--out experiments/results] [--small] [--budget-s 420]

Sparse attention, per query: window 128 + top-k compressed entries (Flash: H 64, top-512; Pro: H 128, top-1024),
D = 512, one shared K=V head; kv = the S raw rows followed by the S/4 compressed entries (a CSA layer's layout).
Useful FLOPs count only the keys each query attends: 4·H·D·(window + k) per query forward, 2.5× that backward
(dq, dkv: five matmuls against the forward's two). The backward is also timed alone (from the forward's out and
lse), the Mosaic GPU kernel next to the XLA formulation it replaced. Dense comparisons at the same S: cuDNN causal flash attention
(H heads, one KV head; D = 512 where cuDNN takes it, else noted) and the dense-mask formulation (all S + S/4 keys
scored, a mask from the indices: what a port without a gather kernel computes), query-chunked so it fits.
Indexer top-k (on a GPU): the forward of `indexer_topk` with implementation "gpu" (Mosaic GPU scores + per-chunk
radix select, which gives top_k's result) and "reference", with the fraction of indices equal between them.
Ceilings measured in the same run: bf16 matmul 8192³ and a device-to-device copy. Times are the device's per
call (timing.device_time: calls under 20 ms dispatched back to back, so the host's ~0.1 ms dispatch-and-wait is
not counted; longer ones synced), medians of N after a compile-and-warm run; each case stops being measured once
the time budget is spent (noted in the table).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pallas_kernels  # noqa: E402
from pallas_kernels.compress import block_slots  # noqa: E402
from pallas_kernels.indexer_topk import causal_visible_end  # noqa: E402
from pallas_kernels.sparse_attention import vjp  # noqa: E402
from pallas_kernels.sparse_attention.gpu import sparse_attention_gpu  # noqa: E402
from pallas_kernels.sparse_attention.gpu_bwd import REDUCE_WIDTH, sparse_attention_gpu_bwd  # noqa: E402
from pallas_kernels.sparse_attention.reference import sparse_attention_reference  # noqa: E402
from timing import copy_bandwidth, device_time, matmul_rate, median_time  # noqa: E402

WINDOW = 128
SHAPES = {"Flash": dict(H=64, topk=512), "Pro": dict(H=128, topk=1024)}
D = 512


def ceilings(small):
  """(bf16 matmul FLOP/s, copy bytes/s): ones [n, n] @ [n, n], and a pass over 4 GiB of float32 (medians of 5)."""
  return (matmul_rate(2048 if small else 8192, steps=5, warmup=1, ones=True),
          copy_bandwidth(jnp.ones((64 if small else 1024, 1 << 20), jnp.float32), steps=5, warmup=1))


def csa_inputs(S, H, topk, seed=0, last=None):
  """q [1,Q,H,D], kv [1, S + S/4, D], indices [1,Q,128+topk]: the window (raw rows) + top-k distinct visible
  compressed entries (offset by S), -1 where fewer are visible. Q = S, or the `last` queries of the S."""
  kq, kk, ks, ki = jax.random.split(jax.random.key(seed), 4)
  n_ent = S // 4
  nq = S if last is None else last
  q = jax.random.normal(kq, (1, nq, H, D), jnp.bfloat16)
  kv = jax.random.normal(kk, (1, S + n_ent, D), jnp.bfloat16)
  sink = jax.random.normal(ks, (H,), jnp.float32)
  t = jnp.arange(S - nq, S)[:, None]
  win = t - WINDOW + 1 + jnp.arange(WINDOW)[None, :]
  win = jnp.where(win >= 0, win, -1)
  visible = (t + 1) // 4  # entries s < floor((t+1)/4)
  # distinct picks: a random permutation-free draw (stride through a random offset; distinct when topk <= n_vis)
  # distinct scattered picks: a stride coprime to the visible count from a random start; all of them when few
  off = jax.random.randint(ki, (nq, 1), 0, 1 << 30)
  j = jnp.arange(topk)[None, :]
  vis = jnp.maximum(visible, 1)
  stride = jnp.where(vis % 7919 == 0, 1, 7919)
  pick = jnp.where(visible <= topk, jnp.where(j < visible, j, -1), (off + j * stride) % vis)
  pick = jnp.where(pick >= 0, pick + S, -1)
  idx = jnp.concatenate([win, pick], axis=1).astype(jnp.int32)[None]
  return q, kv, sink, idx


def dense_mask_attention(q, kv, sink, idx, scale, chunk=1024):
  """Every key scored, the selection applied as a mask (no gather kernel): O(S·T) work."""
  B, S, H, _ = q.shape
  T = kv.shape[1]

  def one(args):
    qc, ic = args  # [B,C,H,D], [B,C,K]
    mask = jnp.zeros((B, qc.shape[1], T), bool)
    mask = jax.vmap(lambda m, i: m.at[jnp.arange(i.shape[0])[:, None], jnp.where(i >= 0, i, T)].set(
        True, mode="drop"))(mask, ic)
    s = jnp.einsum("bchd,btd->bcht", qc, kv, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
    m = jnp.maximum(s.max(-1), sink)
    p = jnp.exp(s - m[..., None])
    l = p.sum(-1) + jnp.exp(sink - m)
    o = jnp.einsum("bcht,btd->bchd", (p / l[..., None]).astype(kv.dtype), kv, preferred_element_type=jnp.float32)
    return o.astype(q.dtype)

  n = S // chunk
  qs = q.reshape(B, n, chunk, H, D).swapaxes(0, 1)
  ids = idx.reshape(B, n, chunk, -1).swapaxes(0, 1)
  return jax.lax.map(one, (qs, ids)).swapaxes(0, 1).reshape(B, S, H, D)


def cudnn_causal(S, H, d):
  q = jnp.ones((1, S, H, d), jnp.bfloat16)
  k = jnp.ones((1, S, 1, d), jnp.bfloat16)
  f = jax.jit(lambda q, k: jax.nn.dot_product_attention(q, k, k, is_causal=True, implementation="cudnn"))
  return device_time(f, q, k), 4 * H * d * S * S / 2


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  ap.add_argument("--small", action="store_true", help="tiny sizes: checks the script runs (CPU/GPU)")
  ap.add_argument("--budget-s", type=float, default=420.0)
  ap.add_argument("--variants", action="store_true",
                  help="also the forward with split=\"none\" and the backward with the other reduction width")
  args = ap.parse_args()
  t_start = time.time()
  on_gpu = jax.default_backend() == "gpu"
  impl = "gpu" if on_gpu else "reference"
  lines = []

  os.makedirs(args.out, exist_ok=True)
  report = os.path.join(args.out, "kernels_small.md" if args.small else "kernels.md")

  def emit(s=""):  # the report is rewritten after every line: a run cut short keeps what it measured
    print(s, flush=True)
    lines.append(s)
    with open(report, "w") as f:
      f.write("\n".join(lines) + "\n")

  mm_flops, copy_bw = ceilings(args.small)
  dev = jax.devices()[0].device_kind
  emit(f"# Kernel benchmark: {datetime.date.today().isoformat()}, {dev}, jax {jax.__version__}, "
       f"Python {platform.python_version()}")
  emit()
  emit(f"Measured ceilings (same run): bf16 matmul {mm_flops / 1e12:.0f} TFLOP/s; copy {copy_bw / 1e9:.0f} GB/s.")
  what = " (forward and backward: the Mosaic GPU kernels)." if on_gpu else " (no GPU here)."
  emit(f"Command: `python experiments/bench_kernels.py{' --small' if args.small else ''}`. "
       f"Kernel = implementation=\"{impl}\"{what}")
  emit()
  over = lambda: time.time() - t_start > args.budget_s  # noqa: E731
  emit("## Compression (spec §5 pooling + RMSNorm + RoPE), Flash CSA shape (c 512, overlap, m 4)")
  emit()
  emit("| S | implementation | ms | GB/s moved | of copy bandwidth |")
  emit("|---|---|---|---|---|")
  for S in ([2048] if args.small else [32768, 131072]):
    if over():
      break
    try:
      emit(_bench_compress(S, copy_bw))
    except Exception as e:  # noqa: BLE001
      emit(f"| {S} | reference | {type(e).__name__}: {str(e)[:100]} | | |")
  emit()
  if on_gpu:
    emit("## Indexer top-k (Flash CSA: 64 index heads × 128, m 4, top-512, causal), forward")
    emit()
    emit("| S | implementation | ms | useful TFLOP/s | of matmul | indices equal to the reference's |")
    emit("|---|---|---|---|---|---|")
    for S in [8192, 32768, 131072]:
      if over():
        emit(f"| {S} | (time budget spent) | | | | |")
        break
      for row_text in _bench_indexer(S, mm_flops):
        emit(row_text)
    emit()
  sizes = [1024, 2048] if args.small else [8192, 32768, 131072]
  emit("## Gather-sparse attention (one CSA layer's attention: window 128 + top-k)")
  emit()
  emit("| shape | S | pass | kernel ms | useful TFLOP/s | of matmul | reference ms | ref TFLOP/s | "
       "dense-mask ms | kernel vs dense-mask | cuDNN dense causal ms |")
  emit("|---|---|---|---|---|---|---|---|---|---|---|")
  scale = D ** -0.5

  for name, shp in SHAPES.items():
    H, topk = shp["H"], shp["topk"]
    if args.small:
      H, topk = min(H, 64), 128
    for S in sizes:
      if over():
        emit(f"| {name} | {S} | | (time budget spent) | | | | | | | |")
        continue
      q, kv, sink, idx = csa_inputs(S, H, topk)
      keys = WINDOW + topk
      fwd_flops = 4 * H * D * keys * S
      kern = jax.jit(functools.partial(pallas_kernels.sparse_attention, scale=scale, implementation=impl))
      ref = jax.jit(functools.partial(sparse_attention_reference, scale=scale))
      row = {}
      try:
        row["k"] = device_time(kern, q, kv, sink, idx)
      except Exception as e:  # noqa: BLE001
        row["k_err"] = f"{type(e).__name__}"
        traceback.print_exc()
      try:
        row["r"] = device_time(ref, q, kv, sink, idx, steps=3)
      except Exception as e:  # noqa: BLE001
        row["r_err"] = type(e).__name__
      dm = "n/a"
      if S <= 32768 and not over():
        try:
          t_dm = device_time(jax.jit(functools.partial(dense_mask_attention, scale=scale)), q, kv, sink, idx,
                             steps=3)
          dm = f"{t_dm * 1e3:.1f}"
          row["dm"] = t_dm
        except Exception as e:  # noqa: BLE001
          dm = type(e).__name__
      elif "dm_prev" in shp:
        t_dm = shp["dm_prev"] * (S / shp["S_prev"]) ** 2
        row["dm"] = t_dm
        dm = f"~{t_dm * 1e3:.0f} (×{(S / shp['S_prev']) ** 2:.0f} from S={shp['S_prev']}, quadratic)"
      if "dm" in row and S <= 32768:
        shp["dm_prev"], shp["S_prev"] = row["dm"], S
      cud = "n/a"
      if not over() and on_gpu:
        for d in (D, 256):
          try:
            t_c, _ = cudnn_causal(S, H, d)
            cud = f"{t_c * 1e3:.1f}" + ("" if d == D else f" (D={d}: cuDNN refuses D=512)")
            break
          except Exception:  # noqa: BLE001
            continue
      k_ms = f"{row['k'] * 1e3:.2f}" if "k" in row else row.get("k_err", "-")
      k_tf = fwd_flops / row["k"] / 1e12 if "k" in row else float("nan")
      r_ms = f"{row['r'] * 1e3:.2f}" if "r" in row else row.get("r_err", "-")
      r_tf = fwd_flops / row["r"] / 1e12 if "r" in row else float("nan")
      ratio = f"{row['dm'] / row['k']:.1f}×" if "dm" in row and "k" in row else "-"
      emit(f"| {name} H={H} k={topk} | {S} | fwd | {k_ms} | {k_tf:.1f} | {k_tf * 1e12 / mm_flops:.1%} | {r_ms} | "
           f"{r_tf:.1f} | {dm} | {ratio} | {cud} |")
      if on_gpu and args.variants and not over():  # the forward with both compute warpgroups on every row
        try:
          t_none = device_time(jax.jit(functools.partial(sparse_attention_gpu, scale=scale, split="none")),
                               q, kv, sink, idx)
          emit(f"| {name} H={H} k={topk} | {S} | fwd, split=\"none\" | {t_none * 1e3:.2f} | "
               f"{fwd_flops / t_none / 1e12:.1f} | {fwd_flops / t_none / mm_flops:.1%} | | | | | |")
        except Exception as e:  # noqa: BLE001
          emit(f"| {name} | {S} | fwd, split=\"none\" | {type(e).__name__} | | | | | | | |")
      if over():
        continue
      # forward + backward through the op (the shared custom_vjp)
      def loss(q, kv, sink, f):
        o, lse = f(q, kv, sink, idx)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse)
      try:
        g = jax.jit(jax.grad(functools.partial(loss, f=kern), argnums=(0, 1, 2)))
        t_fb = device_time(g, q, kv, sink, steps=3)
        fb_flops = fwd_flops * 3.5
        emit(f"| {name} H={H} k={topk} | {S} | fwd+bwd | {t_fb * 1e3:.2f} | {fb_flops / t_fb / 1e12:.1f} | "
             f"{fb_flops / t_fb / mm_flops:.1%} | | | | | |")
      except Exception as e:  # noqa: BLE001
        emit(f"| {name} | {S} | fwd+bwd | {type(e).__name__} | | | | | | | |")
      if on_gpu and not over():
        for row_text in _bench_backward(name, H, topk, S, q, kv, sink, idx, scale, fwd_flops, mm_flops,
                                        args.variants):
          emit(row_text)
  if not args.small and on_gpu and not over():
    S, last = 1 << 20, 1 << 17
    try:  # the last 128K queries of a 1M context (kv: 1M raw rows + 256K entries); q for all 1M would be 64 GiB
      q, kv, sink, idx = csa_inputs(S, 64, 512, last=last)
      kern = jax.jit(functools.partial(pallas_kernels.sparse_attention, scale=scale, implementation=impl))
      t = device_time(kern, q, kv, sink, idx, steps=2)
      emit(f"| Flash H=64 k=512 | 1M context, last 128K queries (×8 = {8 * t * 1e3:.0f} ms for all 1M) | fwd | "
           f"{t * 1e3:.0f} | {4 * 64 * D * 640 * last / t / 1e12:.1f} | {4 * 64 * D * 640 * last / t / mm_flops:.1%} "
           f"| | | | | |")
    except Exception as e:  # noqa: BLE001
      emit(f"| Flash | 1M | fwd | {type(e).__name__}: {str(e)[:80]} | | | | | | | |")
  emit()
  emit(f"Total wall time {time.time() - t_start:.0f} s.")


def _bench_backward(name, H, topk, S, q, kv, sink, idx, scale, fwd_flops, mm_flops, variants=False):
  """Rows for the backward alone (dq, dkv from the forward's out and lse): the Mosaic GPU kernel and the XLA
  formulation it replaced (bf16 matmuls, float32 accumulation, query chunks of 512, one scatter-add per chunk)."""
  out, lse = sparse_attention_gpu(q, kv, sink, idx, scale=scale)
  dout = jax.random.normal(jax.random.key(3), out.shape, jnp.float32).astype(out.dtype)
  delta = jax.jit(lambda o, d: jnp.einsum("BSHD,BSHD->BSH", d, o, preferred_element_type=jnp.float32))(out, dout)
  flops = 2.5 * fwd_flops
  rows = []
  other = 6 - REDUCE_WIDTH  # the kernel with the other reduction width (2 <-> 4)
  cases = [(f"bwd (Mosaic GPU kernel, {REDUCE_WIDTH}-wide reductions)", sparse_attention_gpu_bwd, 5),
           (f"bwd (kernel, {other}-wide reductions)", functools.partial(sparse_attention_gpu_bwd, reduce_width=other),
            5),
           ("bwd (XLA, bf16)", vjp.xla_gpu_bwd, 3)]
  for label, fn, steps in cases if variants else cases[::2]:
    try:
      t = device_time(jax.jit(functools.partial(fn, scale=scale)), q, kv, idx, dout, lse, delta, steps=steps)
      rows.append(f"| {name} H={H} k={topk} | {S} | {label} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} | "
                  f"{flops / t / mm_flops:.1%} | | | | | |")
    except Exception as e:  # noqa: BLE001
      rows.append(f"| {name} | {S} | {label} | {type(e).__name__} | | | | | | | |")
  return rows


def indexer_inputs(S, H=64, d=128, m=4):
  """A Flash indexer's forward inputs at S queries: q [1,S,H,d] bf16, k [1,S/m,d] bf16, w [1,S,H] float32 and
  the causal visible end [1,S] (entries complete by each position)."""
  kq, kk, kw = jax.random.split(jax.random.key(5), 3)
  return (jax.random.normal(kq, (1, S, H, d), jnp.bfloat16), jax.random.normal(kk, (1, S // m, d), jnp.bfloat16),
          jax.random.normal(kw, (1, S, H), jnp.float32), causal_visible_end(jnp.arange(S)[None], m))


def compress_inputs(S, c=512, m=4):
  """A Flash CSA compression's inputs at S rows (c 512, m 4, the 2c-channel overlap): kv bf16, score float32,
  ape, norm weight, the block slots (end, has_prev, positions) of one document, and the rope frequencies."""
  k = jax.random.split(jax.random.key(1), 3)
  kv = jax.random.normal(k[0], (1, S, 2 * c), jnp.bfloat16)
  score = jax.random.normal(k[1], (1, S, 2 * c), jnp.float32)
  end, has_prev, positions = block_slots(jnp.arange(S, dtype=jnp.int32)[None], jnp.zeros((1, S), jnp.int32), m)
  freqs = 1.0 / (10000 ** (np.arange(32) / 32))
  return kv, score, jnp.zeros((m, 2 * c), jnp.float32), jnp.ones((c,), jnp.float32), end, has_prev, positions, freqs


def _bench_indexer(S, mm_flops, H=64, d=128, m=4, topk=512):
  """Rows for the indexer's forward: the GPU path (Mosaic GPU scores + per-chunk radix select, top_k's result)
  and the reference (at S <= 32K; thousands of chunks at 128K). Useful FLOPs: 2·H·d per visible (query, entry)
  pair."""
  q, k, w, end = indexer_inputs(S, H, d, m)
  flops = 2 * H * d * float(jnp.sum(end))
  rows, picks = [], {}
  for impl in ("gpu", "reference") if S <= 32768 else ("gpu",):
    try:
      f = jax.jit(functools.partial(pallas_kernels.indexer_topk, topk=topk, implementation=impl))
      t = device_time(f, q, k, w, end, steps=3)
      picks[impl] = np.asarray(f(q, k, w, end)[0])
      same = f"{np.mean(picks['gpu'] == picks['reference']):.4%}" if len(picks) == 2 else ""
      rows.append(f"| {S} | {impl} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} | {flops / t / mm_flops:.1%} | {same} |")
    except Exception as e:  # noqa: BLE001
      rows.append(f"| {S} | {impl} | {type(e).__name__}: {str(e)[:80]} | | | |")
  return rows


def _bench_compress(S, copy_bw):
  c, m = 512, 4
  kv, score, ape, w, end, has_prev, positions, freqs = compress_inputs(S, c, m)
  moved = kv.size * 2 + score.size * 4 + (S // m) * c * 2
  rows = []
  impls = [("reference", "reference (XLA)")]
  if jax.default_backend() == "gpu":
    impls.append(("gpu", "Mosaic GPU kernel"))
  for impl, name in impls:
    f = jax.jit(lambda kv, score, impl=impl: pallas_kernels.compress(
        kv, score, ape, w, end, has_prev, positions, ratio=m, rope_freqs=freqs, implementation=impl))
    try:
      t = device_time(f, kv, score, steps=20)
      rows.append(f"| {S} | {name} | {t * 1e3:.3f} | {moved / t / 1e9:.0f} | {moved / t / copy_bw:.0%} |")
      if impl == "gpu":  # the earlier tables' method: each call synced, the host's dispatch and wait included
        t = median_time(f, kv, score, steps=20)
        rows.append(f"| {S} | {name}, synced calls | {t * 1e3:.3f} | {moved / t / 1e9:.0f} | "
                    f"{moved / t / copy_bw:.0%} |")
    except Exception as e:  # noqa: BLE001
      rows.append(f"| {S} | {name} | {type(e).__name__}: {str(e)[:100]} | | |")
  return "\n".join(rows)


if __name__ == "__main__":
  main()
