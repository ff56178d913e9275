"""A/B of the serving decode step in one process: the same model and synthetic cache (bench_serve's), the step
(make_decode) compiled once per variant, each timed the bench_serve way (median of synced steps, mean of
back-to-back steps). One process, because synced times move by ±1-2 ms between H200 machines (the step's host
side: dispatch, CUDA-graph update and launch) while the variants differ by less.

  python experiments/decode_ab.py --context 131072 --batch 64 --variants default cb-off cb-no-custom-calls
  python experiments/decode_ab.py --context 8192 --batch 1 --variants gathers-fused gathers-materialized
  JAX_PLATFORMS=cpu python experiments/decode_ab.py --small --context 512 --batch 2   # a CPU check

Variants: `default` (the code as is); `cb-off` (XLA command buffers off for this step: compiler option
xla_gpu_enable_command_buffer=""), `cb-no-custom-calls` (graphs of fusions and cuBLAS/cuDNN calls only, the
Mosaic GPU kernels launched alone); `gathers-fused` / `gathers-materialized` (needs dsv4_jax.model.decode
.materialized, which only commit a7005a3 has: `git checkout a7005a3 -- dsv4_jax/model/decode.py`);
`sinkhorn-kN` (mHC's Sinkhorn with N iterations per fused kernel: dsv4_jax.model.mhc.ITERS_PER_FUSION = N),
`sinkhorn-lists` (the form before b960015: the n·n values cross each per-iteration barrier as n·n arrays);
`engine` (the serving engine's step, dispatch-ahead, one streaming request per slot: experiments/engine_timing.py,
its own backend and synthetic cache at the same context; "synced" is the median engine step, "back-to-back"
the mean).
Prints one RESULT line per variant.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from bench_serve import bench_config, fill_synthetic, log, time_decode, time_engine_modes  # noqa: E402

COMPILER_OPTIONS = {"default": None, "cb-off": {"xla_gpu_enable_command_buffer": ""},
                    "cb-no-custom-calls": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUDNN"}}
GATHERS = ("gathers-fused", "gathers-materialized")
SINKHORN = ("sinkhorn-k1", "sinkhorn-k2", "sinkhorn-k4", "sinkhorn-k8", "sinkhorn-lists")


_CODE_SINKHORN = []  # mhc._sinkhorn_unrolled as the code has it (main sets it before patching)


def sinkhorn_lists(logits_NN, iters: int, eps: float):
  """mHC's unrolled Sinkhorn as before b960015: a barrier per iteration, the values crossing it as n·n arrays."""
  from dsv4_jax.model import mhc  # noqa: PLC0415
  first = _CODE_SINKHORN[0](logits_NN, 1, eps)  # the code's row softmax + first column normalization
  n = first.shape[-1]
  c = [[first[..., i, j] for j in range(n)] for i in range(n)]
  for _ in range(iters - 1):
    c = jax.lax.optimization_barrier(mhc._normalize_cols(mhc._normalize_rows(c, eps), eps))
  return jax.numpy.stack([jax.numpy.stack(row, axis=-1) for row in c], axis=-2)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--context", type=int, default=131072)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--experts", type=int, default=32)
  ap.add_argument("--small", action="store_true", help="bench_serve's tiny model, reference attention: a CPU check")
  ap.add_argument("--variants", nargs="+", default=["default", "cb-off"],
                  choices=sorted(COMPILER_OPTIONS) + list(GATHERS) + list(SINKHORN) + ["engine"])
  args = ap.parse_args(argv)
  from dsv4_jax.model import decode as decode_lib  # noqa: PLC0415
  from dsv4_jax.model import mhc  # noqa: PLC0415
  from dsv4_jax.model.transformer import DeepSeekV4  # noqa: PLC0415
  from dsv4_jax.serve.steps import make_decode  # noqa: PLC0415
  if any(v in GATHERS for v in args.variants) and not hasattr(decode_lib, "materialized"):
    ap.error("the gathers-* variants need commit a7005a3's decode.py (see the docstring)")
  cfg = bench_config(args.small, args.experts, attention_impl="reference" if args.small else "gpu")
  cfg = cfg.replace(scan_layers=False)
  model = DeepSeekV4(cfg, rngs=nnx.Rngs(0))
  per_variant = 1 + args.warmup + 2 * args.steps
  max_len = args.context + 256 * -(-(per_variant * len(args.variants)) // 256)
  cache = fill_synthetic(model.init_cache(args.batch, max_len, kv_format="fp8"), cfg, args.context,
                         seed=args.context + args.batch)
  jax.block_until_ready(cache)
  keep = getattr(decode_lib, "materialized", None)  # each gathers-* variant sets it before its trace
  sinkhorn, iters_per_fusion = mhc._sinkhorn_unrolled, mhc.ITERS_PER_FUSION
  _CODE_SINKHORN[:] = [sinkhorn]
  for name in args.variants:
    mhc._sinkhorn_unrolled, mhc.ITERS_PER_FUSION = sinkhorn, iters_per_fusion  # the code's, unless set below
    if name == "engine":
      [(_, e)] = time_engine_modes(model, cfg, args.batch, args.context, args.steps, args.warmup, "fp8")
      log(f"RESULT {args.context} x {args.batch} engine: synced {e['step_s'] * 1e3:.3f} ms, back-to-back "
          f"{e['mean_s'] * 1e3:.3f} ms, compile + first {e['first_s']:.0f} s")
      continue
    if name in SINKHORN:
      if name == "sinkhorn-lists":
        mhc._sinkhorn_unrolled = sinkhorn_lists
      else:
        mhc.ITERS_PER_FUSION = int(name.removeprefix("sinkhorn-k"))
      decode = make_decode(model)
    elif name in GATHERS:
      decode_lib.materialized = keep if name == "gathers-materialized" else (lambda rows: rows)
      decode = make_decode(model)
    else:
      decode = make_decode(model, compiler_options=COMPILER_OPTIONS[name])
    s, p, first, cache = time_decode(decode, cache, args.batch, cfg.vocab_size, args.steps, args.warmup,
                                     max_context=max_len)
    log(f"RESULT {args.context} x {args.batch} {name}: synced {s * 1e3:.3f} ms, back-to-back {p * 1e3:.3f} ms, "
        f"compile + first {first:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
