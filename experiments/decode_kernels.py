"""Kernels of the serving decode step on an H200, counted without a GPU: a deviceless XLA:GPU compile (jax's
CUDA plugin, target = an H200 description written here) of bench_serve's model (per-layer weights, GPU kernels,
FP8 cache), then the compiled thunk sequence read from XLA's dump. Finds kernel-count and compile-time
regressions on a CPU box before they cost device time.

  pip install --target /tmp/cudapkgs "jax-cuda12-plugin==$(python -c 'import jax; print(jax.__version__)')" \
      "jax-cuda12-pjrt==$(python -c 'import jax; print(jax.__version__)')"
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu,cuda PYTHONPATH=/tmp/cudapkgs \
      python experiments/decode_kernels.py --context 8192 --batch 1

Prints the compile time, the kernels launched per step (fusions and library calls as XLA emitted them; the
Mosaic GPU kernels are the custom calls) and the most frequent fusion kinds. Without a GPU, XLA cannot size
CUB's scratch and emits its own sort kernel for the indexer's top-k (one kernel where the device runs a CUB
sort), and no autotuning happens, so the counts are the device's within a few.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

H200 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150000000000 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H200"
"""

_THUNK = re.compile(r"^\s*\d+: (k\w+)\s+\[[^\]]*\]\s*(\S*)")


def count_thunks(path: str) -> tuple[collections.Counter, collections.Counter]:
  """(thunk kinds, fusion kinds with their numeric suffix dropped) of a thunk_sequence.txt dump."""
  kinds, fusions = collections.Counter(), collections.Counter()
  with open(path) as f:
    for line in f:
      m = _THUNK.match(line)
      if m:
        kinds[m.group(1)] += 1
        if m.group(1) == "kCustomKernel" and m.group(2):
          fusions[re.sub(r"(_\d+)+$", "", m.group(2))] += 1
  return kinds, fusions


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--context", type=int, default=131072)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--experts", type=int, default=32)
  ap.add_argument("--sinkhorn-iters-per-fusion", type=int, default=None,
                  help="set dsv4_jax.model.mhc.ITERS_PER_FUSION for this compile (default: the code's)")
  ap.add_argument("--sinkhorn-stacked-max-rows", type=int, default=None,
                  help="set dsv4_jax.model.mhc.STACKED_MAX_ROWS for this compile (default: the code's)")
  ap.add_argument("--dump", default=None, help="XLA dump directory (default: a temporary one)")
  args = ap.parse_args(argv)
  dump = args.dump or tempfile.mkdtemp(prefix="dsv4_decode_kernels_")
  if "jax" in sys.modules:
    raise RuntimeError("run as a script: XLA_FLAGS must be set before jax starts")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} "
                             "--xla_dump_hlo_module_re=jit_step --xla_dump_hlo_pass_re=NOTHING").strip()
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from jax.experimental import topologies  # noqa: PLC0415

  from bench_serve import bench_config  # noqa: PLC0415
  from dsv4_jax.model.transformer import DeepSeekV4  # noqa: PLC0415
  from dsv4_jax.serve.backend import serving_model  # noqa: PLC0415

  try:
    device = topologies.get_topology_desc(platform="cuda", target_config=H200, topology="1x1x1").devices[0]
  except Exception as e:  # noqa: BLE001
    raise SystemExit(f"no deviceless CUDA compile here ({type(e).__name__}: {e}); see the docstring for the "
                     "plugin install and environment") from None
  from dsv4_jax.model import mhc  # noqa: PLC0415
  if args.sinkhorn_iters_per_fusion:
    mhc.ITERS_PER_FUSION = args.sinkhorn_iters_per_fusion
  if args.sinkhorn_stacked_max_rows is not None:
    mhc.STACKED_MAX_ROWS = args.sinkhorn_stacked_max_rows
  jax.default_backend = lambda: "gpu"  # the kernels' dispatch asks the default backend; the target is a GPU
  cfg = bench_config(False, args.experts, attention_impl="gpu").replace(scan_layers=False)
  model = serving_model(nnx.eval_shape(lambda: DeepSeekV4(cfg, rngs=nnx.Rngs(0))))
  max_len = args.context + 256
  cache = jax.eval_shape(lambda: model.init_cache(args.batch, max_len, kv_format="fp8"))
  graphdef, state = nnx.split(model)
  on = jax.sharding.SingleDeviceSharding(device)
  spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), t)

  def step(state, cache, tokens):
    return nnx.merge(graphdef, state).decode(tokens, cache, max_context=max_len)

  t = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(1,)).lower(spec(state), spec(cache),
                                                     jax.ShapeDtypeStruct((args.batch, 1), jnp.int32, sharding=on))
  t_lower = time.perf_counter() - t
  t = time.perf_counter()
  lowered.compile()
  t_compile = time.perf_counter() - t
  found = sorted(glob.glob(os.path.join(dump, "*jit_step*thunk_sequence.txt")))
  if not found:
    raise SystemExit(f"no thunk sequence dumped under {dump}")
  kinds, fusions = count_thunks(found[0])
  kernels = kinds["kCustomKernel"] + kinds["kKernel"] + kinds["kCustomCall"] + kinds["kGemm"] + kinds["kCublasLtMatmul"]
  print(f"decode step {args.context} x {args.batch} (H200 target, deviceless): lower {t_lower:.1f} s, compile "
        f"{t_compile:.1f} s; {kernels} kernels ({', '.join(f'{k} {n}' for k, n in kinds.most_common())})")
  for name, n in fusions.most_common(8):
    print(f"  {n:5d}  {name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
