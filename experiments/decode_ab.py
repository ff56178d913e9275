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
.materialized, which only commit a7005a3 has: `git checkout a7005a3 -- dsv4_jax/model/decode.py`).
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

from bench_serve import bench_config, fill_synthetic, log, time_decode  # noqa: E402

COMPILER_OPTIONS = {"default": None, "cb-off": {"xla_gpu_enable_command_buffer": ""},
                    "cb-no-custom-calls": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUDNN"}}
GATHERS = ("gathers-fused", "gathers-materialized")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--context", type=int, default=131072)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--experts", type=int, default=32)
  ap.add_argument("--small", action="store_true", help="bench_serve's tiny model, reference attention: a CPU check")
  ap.add_argument("--variants", nargs="+", default=["default", "cb-off"],
                  choices=sorted(COMPILER_OPTIONS) + list(GATHERS))
  args = ap.parse_args(argv)
  from dsv4_jax.model import decode as decode_lib  # noqa: PLC0415
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
  for name in args.variants:
    if name in GATHERS:
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
