"""Ahead-of-time TPU compiles of the compress kernels from this CPU host (libtpu's Mosaic and XLA:TPU compilers:
lowering errors and VMEM overflows fail here) for v5p and v6e, at Flash shapes (c = 512, 64 rope dims, float32
projected rows, bf16 entries), batch 1 per device, with the memory figures of `compiled.memory_analysis()` and
checks on the compiled HLO (`compiled.as_text()`).

Forward (entries, and the FP8 cache rows), and forward + backward as training runs them (jax.vjp in one jit: the
Mosaic forward and backward kernels). kv and score must reach every Mosaic call as the jit's parameters themselves
(no relayout copy or transpose of the inputs), and the temporaries stay a fraction of the inputs (an input copy,
the reference VJP's gathers or anything [S, S]-sized would not fit the bounds). In CI: CSA (m = 4, overlap) and
HCA (m = 128) at S = 64K on v5p and v6e (v6e CSA: forward + backward only). With DSV4_AOT_ALL=1 also the v6e CSA
forward and FP8 rows, and the CSA forward at S = 256K on v5p.
"""

from __future__ import annotations

from aot_util import abstract_arg, compile_tpu, hbm_bytes, only_all  # first: sets libtpu's env

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.compress import reference
from pallas_kernels.sparse_attention.tpu import compile_for_tpu

C_HEAD, ROPE = 512, 64
FREQS = tuple(float(f) for f in (1.0 / 160000.0 ** (np.arange(0, ROPE, 2) / ROPE)).astype(np.float32))
# (topology, m, S, parts): "f" forward, "8" FP8 rows, "b" forward + backward.
CASES = [("v5p:2x2x1", 4, 65536, "f8b"), ("v5p:2x2x1", 128, 65536, "fb"), ("v6e:2x2", 4, 65536, "b"),
         ("v6e:2x2", 128, 65536, "fb"), pytest.param("v6e:2x2", 4, 65536, "f8", marks=only_all)]


def _args(topology, m, S):
  arg = abstract_arg(topology)
  C = 2 * C_HEAD if m == 4 else C_HEAD
  N = S // m
  return (arg((1, S, C), jnp.float32), arg((1, S, C), jnp.float32), arg((m, C), jnp.float32),
          arg((C_HEAD,), jnp.float32), arg((1, N), jnp.int32), arg((1, N), jnp.bool_), arg((1, N), jnp.int32))


def _op(m, output="entries"):
  return lambda *a: pallas_kernels.compress(*a, ratio=m, rope_freqs=FREQS, out_dtype=jnp.bfloat16, output=output,
                                            implementation="tpu")


def _compile(label, fn, args):
  """(memory_analysis, HLO text) of jax.jit(fn) compiled for the arguments' TPU; prints the memory figures."""
  with compile_for_tpu():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
  mem, gib = compiled.memory_analysis(), lambda n: f"{n / 2**30:.3f}"
  print(f"\n{label}: argument {gib(mem.argument_size_in_bytes)} GiB, output {gib(mem.output_size_in_bytes)} GiB, "
        f"temp {gib(mem.temp_size_in_bytes)} GiB; compiled in {time.perf_counter() - start:.1f} s")
  return mem, compiled.as_text()


def assert_inputs_uncopied(hlo: str, shape: str, n_calls: int):
  """Every Mosaic call's operands of `shape` (kv, score) are entry parameters, and nothing copies or transposes
  an array of that shape."""
  defs = {}
  for line in hlo.splitlines():
    found = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)
    if found:
      defs[found.group(1)] = found.group(2)
  calls = [rhs for rhs in defs.values() if 'custom_call_target="tpu_custom_call"' in rhs]
  assert len(calls) == n_calls, f"{len(calls)} Mosaic calls, expected {n_calls}"
  for rhs in calls:
    operands = re.findall(r"%([\w.\-]+)", re.search(r"custom-call\((.*?)\), custom_call_target", rhs).group(1))
    rows = [defs[o] for o in operands if defs[o].startswith(shape + "{")]
    assert len(rows) >= 2, f"kv and score ({shape}) are not operands of the Mosaic call {rhs[:200]}"
    assert all(" parameter(" in d for d in rows), [d[:160] for d in rows if " parameter(" not in d]
  copies = re.findall(re.escape(shape) + r"\{[^}]*\} (copy|transpose|copy-start)\(", hlo)
  assert not copies, f"{len(copies)} copies / transposes of {shape}"


@pytest.mark.parametrize("topology,m,S,parts", CASES)
def test_compiles_with_sane_memory(topology, m, S, parts):
  args = _args(topology, m, S)
  in_bytes = 2 * args[0].size * 4  # kv + score, float32
  N = S // m
  entry_bytes = N * C_HEAD * 2
  hbm = hbm_bytes(topology)
  rows = f"f32[1,{S},{args[0].shape[2]}]"

  label = f"{topology} m={m} S={S}"
  if "f" in parts:
    mem, hlo = _compile(f"{label} forward", _op(m), args)
    assert_inputs_uncopied(hlo, rows, 1)
    assert in_bytes <= mem.argument_size_in_bytes <= in_bytes + 64 * N + 2**20
    assert entry_bytes <= mem.output_size_in_bytes <= entry_bytes + 2**20
    # The per-slot lane tables and flags; a copy of the inputs would be 10x over.
    assert mem.temp_size_in_bytes <= 0.1 * in_bytes, mem.temp_size_in_bytes
  if "8" in parts:
    mem = compile_tpu(f"{label} fp8 rows", _op(m, "fp8"), args, digits=3)
    assert mem.output_size_in_bytes <= N * reference.fp8_row_bytes(C_HEAD, ROPE) + 2**20
    assert mem.temp_size_in_bytes <= 0.1 * in_bytes + 8 * N * C_HEAD, mem.temp_size_in_bytes
  if "b" not in parts:
    return

  def fwd_bwd(kv, score, ape, w, end, has_prev, pos, d_out):
    out, pullback = jax.vjp(lambda *d: _op(m)(*d, end, has_prev, pos), kv, score, ape, w)
    return (out,) + pullback(d_out)

  d_out = jax.ShapeDtypeStruct((1, N, C_HEAD), jnp.bfloat16, sharding=args[0].sharding)
  mem, hlo = _compile(f"{label} forward+backward", fwd_bwd, args + (d_out,))
  assert_inputs_uncopied(hlo, rows, 2)
  assert mem.output_size_in_bytes <= entry_bytes + in_bytes + 2**20  # entries, dkv, dscore, dape, dweight
  # Per-row-block slot tables (d(entries), RoPE lanes: [N, c]-sized) only: the reference VJP's gathers (> 2x the
  # inputs), an input copy or an [S, S] temporary would not fit.
  assert mem.temp_size_in_bytes <= 0.25 * in_bytes + 32 * 2**20, mem.temp_size_in_bytes
  assert mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes < 0.9 * hbm


@only_all
def test_forward_256k_v5p():
  mem, hlo = _compile("v5p:2x2x1 m=4 S=256K forward", _op(4), _args("v5p:2x2x1", 4, 262144))
  assert_inputs_uncopied(hlo, "f32[1,262144,1024]", 1)
  assert mem.temp_size_in_bytes <= 0.1 * 2 * 262144 * 1024 * 4
