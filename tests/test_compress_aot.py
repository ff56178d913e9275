"""Ahead-of-time TPU compiles of the compress kernel from this CPU host (libtpu's Mosaic and XLA:TPU compilers:
lowering errors and VMEM overflows fail here) for v5p and v6e, at Flash shapes (c = 512, 64 rope dims, float32
projected rows, bf16 entries), batch 1 per device, with the memory figures of `compiled.memory_analysis()`.

Forward (entries, and the FP8 cache rows), and forward + backward as training runs them (jax.vjp in one jit;
the backward is the reference's VJP). In CI: CSA (m = 4, overlap) and HCA (m = 128) at S = 64K on v5p, the CSA
forward on v6e. With DSV4_AOT_ALL=1 the rest on v6e and the CSA forward at S = 256K on v5p.
"""

from __future__ import annotations

from aot_util import abstract_arg, compile_tpu, hbm_bytes, only_all  # first: sets libtpu's env

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.compress import reference

C_HEAD, ROPE = 512, 64
FREQS = tuple(float(f) for f in (1.0 / 160000.0 ** (np.arange(0, ROPE, 2) / ROPE)).astype(np.float32))
# (topology, m, S, parts): "f" forward, "8" FP8 rows, "b" forward + backward.
CASES = [("v5p:2x2x1", 4, 65536, "f8b"), ("v5p:2x2x1", 128, 65536, "fb"), ("v6e:2x2", 4, 65536, "f"),
         pytest.param("v6e:2x2", 4, 65536, "8b", marks=only_all),
         pytest.param("v6e:2x2", 128, 65536, "f8b", marks=only_all)]


def _args(topology, m, S):
  arg = abstract_arg(topology)
  C = 2 * C_HEAD if m == 4 else C_HEAD
  N = S // m
  return (arg((1, S, C), jnp.float32), arg((1, S, C), jnp.float32), arg((m, C), jnp.float32),
          arg((C_HEAD,), jnp.float32), arg((1, N), jnp.int32), arg((1, N), jnp.bool_), arg((1, N), jnp.int32))


def _op(m, output="entries"):
  return lambda *a: pallas_kernels.compress(*a, ratio=m, rope_freqs=FREQS, out_dtype=jnp.bfloat16, output=output,
                                            implementation="tpu")


@pytest.mark.parametrize("topology,m,S,parts", CASES)
def test_compiles_with_sane_memory(topology, m, S, parts):
  args = _args(topology, m, S)
  in_bytes = 2 * args[0].size * 4  # kv + score, float32
  N = S // m
  entry_bytes = N * C_HEAD * 2
  hbm = hbm_bytes(topology)

  label = f"{topology} m={m} S={S}"
  if "f" in parts:
    mem = compile_tpu(f"{label} forward", _op(m), args, digits=3)
    assert in_bytes <= mem.argument_size_in_bytes <= in_bytes + 64 * N + 2**20
    assert entry_bytes <= mem.output_size_in_bytes <= entry_bytes + 2**20
    # The row view of kv / score (a relayout copy of both inputs in XLA:TPU today), the lane tables; no more.
    assert mem.temp_size_in_bytes <= 1.1 * in_bytes + 64 * 2**20, mem.temp_size_in_bytes
  if "8" in parts:
    mem = compile_tpu(f"{label} fp8 rows", _op(m, "fp8"), args, digits=3)
    assert mem.output_size_in_bytes <= N * reference.fp8_row_bytes(C_HEAD, ROPE) + 2**20
    assert mem.temp_size_in_bytes <= 1.1 * in_bytes + 8 * N * C_HEAD + 64 * 2**20
  if "b" not in parts:
    return

  def fwd_bwd(kv, score, ape, w, end, has_prev, pos, d_out):
    out, pullback = jax.vjp(lambda *d: _op(m)(*d, end, has_prev, pos), kv, score, ape, w)
    return (out,) + pullback(d_out)

  d_out = jax.ShapeDtypeStruct((1, N, C_HEAD), jnp.bfloat16, sharding=args[0].sharding)
  mem = compile_tpu(f"{label} forward+backward", fwd_bwd, args + (d_out,), digits=3)
  assert mem.output_size_in_bytes <= entry_bytes + in_bytes + 2**20  # entries, dkv, dscore, dape, dweight
  # The reference backward's gathers are the size of the inputs (a few float32 copies), never [S, S].
  assert mem.temp_size_in_bytes <= 6 * in_bytes + 256 * 2**20, mem.temp_size_in_bytes
  assert mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes < 0.9 * hbm


@only_all
def test_forward_256k_v5p():
  mem = compile_tpu("v5p:2x2x1 m=4 S=256K forward", _op(4), _args("v5p:2x2x1", 4, 262144), digits=3)
  assert mem.temp_size_in_bytes <= 1.1 * 2 * 262144 * 1024 * 4 + 64 * 2**20
