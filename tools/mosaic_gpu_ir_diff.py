"""Is a refactored Mosaic GPU kernel the same kernel? Compare the Mosaic GPU modules two versions of a kernel file
lower to (without debug locations), on any machine: no GPU needed, so a refactor can be proven not to change a
kernel that was verified on the device.

  python tools/mosaic_gpu_ir_diff.py OLD.py NEW.py [--fn sparse_attention_gpu] [--kw '{"split": "rows"}']
  python tools/mosaic_gpu_ir_diff.py <(git show HEAD:pallas_kernels/sparse_attention/gpu.py) \\
      pallas_kernels/sparse_attention/gpu.py

OLD/NEW: files defining `fn(q [B,S,H,D], kv [B,T,D], sink [H], indices [B,S,K], *, scale, **kw)` (the sparse
attention kernels' signature); both are lowered for CUDA with jax.export at a few shapes. Exit status 0 when every
module is identical, 1 otherwise (a unified diff of the first difference is printed).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402
from jax.experimental.mosaic.gpu import core as mosaic_core  # noqa: E402

SHAPES = [(64, 512, 128), (128, 512, 1152), (8, 128, 70)]  # (H, D, K)


def _load(path: str, name: str):
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:  # path may be a pipe (<(git show ...))
    with open(path) as src:
      shutil.copyfileobj(src, f)
  spec = importlib.util.spec_from_file_location(name, f.name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def modules(fn, shape, kw) -> str:
  """The Mosaic GPU module text(s) `fn` lowers to at `shape`, debug locations and dump names dropped."""
  captured = []
  serde = mosaic_core._run_serde_pass

  def capture(module, **kwargs):
    captured.append(module.operation.get_asm(enable_debug_info=False))
    return serde(module, **kwargs)

  H, D, K = shape
  args = (jax.ShapeDtypeStruct((1, 8, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((1, 1024, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((H,), jnp.float32), jax.ShapeDtypeStruct((1, 8, K), jnp.int32))
  mosaic_core._run_serde_pass = capture
  try:
    export.export(jax.jit(functools.partial(fn, scale=0.05, **kw)), platforms=["cuda"])(*args)
  finally:
    mosaic_core._run_serde_pass = serde
  if not captured:
    raise SystemExit("no Mosaic GPU module was lowered: is this a Mosaic GPU kernel?")
  return re.sub(r'mosaic_gpu.dump_basename = "[^"]*"', "", "\n".join(captured))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("old")
  ap.add_argument("new")
  ap.add_argument("--fn", default="sparse_attention_gpu")
  ap.add_argument("--kw", action="append", default=None, help="JSON keyword arguments; repeat for several")
  args = ap.parse_args(argv)
  old, new = (getattr(_load(p, f"_kernel_{i}"), args.fn) for i, p in enumerate((args.old, args.new)))
  same = True
  for kw in [json.loads(k) for k in (args.kw or ["{}"])]:
    for shape in SHAPES:
      a, b = modules(old, shape, kw), modules(new, shape, kw)
      print(f"H, D, K = {shape} {kw or ''}: {'identical' if a == b else 'DIFFERENT'} ({len(a):,} characters)")
      if a != b and same:
        print("\n".join(list(difflib.unified_diff(a.splitlines(), b.splitlines(), "old", "new", lineterm=""))[:40]))
      same &= a == b
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
