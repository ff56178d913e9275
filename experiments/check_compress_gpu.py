"""H200 check of the compress Mosaic GPU kernel (pallas_kernels/compress/gpu.py): correctness against the
reference and bandwidth, Flash CSA (c 512, m 4, overlap) and HCA (c 512, m 128) at S = 32K and 128K.

  python experiments/check_compress_gpu.py            # on the H200 (under 3 minutes)
  python experiments/check_compress_gpu.py --small --n 2   # anywhere: tiny S, GPU interpret mode off GPU

Per case: max abs / rel error (of max |ref|) of the kernel's entries against the reference (and the count of
entries more than 1% off), then the median of N synced runs after a warm-up of the kernel and of the reference, as GB/s
moved (kv + score bytes read + entries written, as experiments/bench_kernels.py `_bench_compress` counts) and
as a fraction of the copy bandwidth measured in the same run. A tuning sweep (slots per CTA × stages in flight)
at the Flash 128K shape follows (pass the best as GROUP / STAGES / STAGE_BYTES in gpu.py). A watchdog ends the run if a case passes its time limit (a hung kernel).
Prints as it goes.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from pallas_kernels.compress import block_slots, gpu, reference
import timing

C_HEAD, ROPE = 512, 64
FREQS = tuple(float(f) for f in np.asarray(1.0 / (10000 ** (np.arange(ROPE // 2) / (ROPE // 2))), np.float32))


def copy_bandwidth(small):
  """The copy ceiling as experiments/bench_kernels.py `ceilings` measures it."""
  return timing.copy_bandwidth(jnp.ones((64 if small else 1024, 1 << 20), jnp.float32), steps=5, warmup=1)


def inputs(S, m, overlap, kv_dtype, score_dtype, cuts=0, seed=0):
  C = 2 * C_HEAD if overlap else C_HEAD
  k = jax.random.split(jax.random.key(seed), 5)
  kv = jax.random.normal(k[0], (1, S, C), jnp.float32).astype(kv_dtype)
  score = (2 * jax.random.normal(k[1], (1, S, C), jnp.float32)).astype(score_dtype)
  ape = 0.5 * jax.random.normal(k[2], (m, C), jnp.float32)
  w = 1 + 0.3 * jax.random.normal(k[3], (C_HEAD,), jnp.float32)
  seg = jnp.zeros((1, S), jnp.int32)
  if cuts:  # packed documents: cuts at random rows (blocks restart; runs of consecutive slots break)
    at = np.sort(np.random.default_rng(seed).choice(np.arange(1, S), cuts, replace=False))
    seg = jnp.asarray(np.searchsorted(at, np.arange(S), side="right")[None].astype(np.int32))
  starts = jnp.concatenate([jnp.ones((1, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  idx = jnp.arange(S, dtype=jnp.int32)[None]
  pos = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  end, has_prev, positions = block_slots(pos, seg, m)
  return kv, score, ape, w, end, has_prev, positions


def run_case(name, S, m, overlap, kv_dtype, score_dtype, copy_bw, args, cuts=0, time_it=True, **kw):
  t0 = time.time()
  a = inputs(S, m, overlap, kv_dtype, score_dtype, cuts)
  spec = reference.Spec(ratio=m, overlap=overlap, rope_freqs=FREQS, eps=1e-6, out_dtype="bfloat16")
  interpret = None if jax.default_backend() == "gpu" else gpu.plgpu.InterpretGPUParams()
  kern = jax.jit(lambda *x: gpu.compress_gpu(*x, spec, interpret=interpret, **kw))
  ref = jax.jit(lambda *x: reference.compress_reference(*x, spec))
  got = np.asarray(kern(*a).astype(jnp.float32))
  want = np.asarray(ref(*a).astype(jnp.float32))
  err = np.abs(got - want)
  scale = max(float(np.abs(want).max()), 1e-6)
  bad = int(np.sum(err > 1e-2 * scale))  # bf16 entries: a pooled value rounding the other way moves ~1 ulp
  ok = np.isfinite(got).all() and err.max() <= 2e-2 * scale and not np.any(got[np.asarray(a[4]) < 0])
  print(f"{name:<30} S={S:>6} kv {jnp.dtype(kv_dtype).name} score {jnp.dtype(score_dtype).name}: "
        f"max abs err {err.max():.3g}, max rel err {err.max() / scale:.3g} (of max |ref| {scale:.3g}), "
        f"{bad} of {err.size} > 1% of it, {'OK' if ok else 'MISMATCH'}", flush=True)
  if not time_it:
    return
  kv, score = a[0], a[1]
  N = a[4].shape[1]
  moved = kv.size * kv.dtype.itemsize + score.size * score.dtype.itemsize + N * C_HEAD * 2
  for label, f in (("gpu kernel", kern), ("reference (XLA)", ref)):
    t = timing.median_time(f, *a, steps=args.n)
    print(f"    {label:<16} {t * 1e3:8.3f} ms  {moved / t / 1e9:7.0f} GB/s  {moved / t / copy_bw:6.1%} of copy",
          flush=True)
  print(f"    ({time.time() - t0:.1f} s)", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="S = 256 / 512: checks the script (interpret off GPU)")
  ap.add_argument("--n", type=int, default=25, help="timed runs per measurement (median)")
  ap.add_argument("--case-limit-s", type=float, default=60.0, help="watchdog per case")
  ap.add_argument("--no-sweep", action="store_true")
  args = ap.parse_args()
  t_start = time.time()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, backend {jax.default_backend()}", flush=True)
  if jax.default_backend() != "gpu" and not args.small:
    sys.exit("no GPU: run with --small (interpret mode) to check the script")
  copy_bw = copy_bandwidth(args.small)
  print(f"copy bandwidth (same run): {copy_bw / 1e9:.0f} GB/s", flush=True)
  bf16, f32 = jnp.bfloat16, jnp.float32
  sizes = [256, 512] if args.small else [32768, 131072]
  cases = [("Flash CSA (m 4, overlap)", S, 4, True, bf16, f32, {}) for S in sizes]
  cases += [("HCA (m 128)", S, 128, False, bf16, f32, {}) for S in sizes]
  cases += [("Flash CSA, bf16 score", sizes[0], 4, True, bf16, bf16, {}),
            ("HCA, bf16 score", sizes[0], 128, False, bf16, bf16, {}),
            ("Flash CSA, packed documents", sizes[0], 4, True, bf16, f32, {"cuts": 37, "time_it": False}),
            ("HCA, packed documents", sizes[0], 128, False, bf16, f32, {"cuts": 11, "time_it": False})]
  for name, S, m, overlap, kd, sd, kw in cases:
    faulthandler.dump_traceback_later(args.case_limit_s, exit=True)
    try:
      run_case(name, S, m, overlap, kd, sd, copy_bw, args, **kw)
    except Exception as e:  # noqa: BLE001
      print(f"{name} S={S}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    faulthandler.cancel_dump_traceback_later()
  if not args.no_sweep:
    S = sizes[-1]
    print(f"tuning sweep, Flash CSA S={S} (group = slots per CTA, stages = stages in flight, stage = bytes of "
          "kv + score rows per stage):", flush=True)
    a = inputs(S, 4, True, bf16, f32)
    spec = reference.Spec(ratio=4, overlap=True, rope_freqs=FREQS, eps=1e-6, out_dtype="bfloat16")
    moved = a[0].size * 2 + a[1].size * 4 + a[4].shape[1] * C_HEAD * 2
    interpret = None if jax.default_backend() == "gpu" else gpu.plgpu.InterpretGPUParams()
    # (slots per CTA, stages in flight, stage KiB): 12 KiB stages (2 rows, ~90 KiB of SMEM) fit two CTAs per SM
    configs = [(16, 2, 24)] if args.small else [(16, 2, 24), (16, 3, 24), (32, 2, 24), (32, 3, 24), (64, 2, 24),
                                                (64, 3, 24), (16, 2, 12), (16, 4, 12), (32, 4, 12)]
    for group, stages, kib in configs:
      if time.time() - t_start > 165:
        print("  (time budget spent)", flush=True)
        break
      faulthandler.dump_traceback_later(args.case_limit_s, exit=True)
      try:
        f = jax.jit(functools.partial(gpu.compress_gpu, spec=spec, interpret=interpret, group=group, stages=stages,
                                      stage_bytes=kib * 1024))
        t = timing.median_time(f, *a, steps=args.n)
        print(f"  group {group:>2} stages {stages} stage {kib:>2} KiB: {t * 1e3:8.3f} ms  {moved / t / 1e9:7.0f} "
              f"GB/s  {moved / t / copy_bw:6.1%} of copy", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"  group {group} stages {stages} stage {kib} KiB: {type(e).__name__}: {str(e)[:200]}", flush=True)
      faulthandler.cancel_dump_traceback_later()
  print(f"total {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
