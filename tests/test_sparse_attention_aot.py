"""Ahead-of-time TPU compiles of the sparse-attention kernels from this CPU host: libtpu's real Mosaic and XLA:TPU
compilers (lowering errors and VMEM overflows fail here) for v5p and v6e topologies, at production shapes, with
the memory figures of `compiled.memory_analysis()`.

Forward, and forward + backward as training runs them (jax.vjp in one jit), per device, batch 1, D = 512, bf16.
In CI: Flash (H=64, K = 128 window + 512 top-k) at S = 64K on each topology. With DSV4_AOT_ALL=1 also Pro
(H=128, K = 128 + 1024): 64K on v5p, 32K on v6e (at 64K its q, out, dO and dq alone exceed v6e's 32 GB).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu otherwise locks out a second process using it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels.sparse_attention import tpu  # noqa: E402

pytest.importorskip("libtpu", reason="AOT TPU compiles need libtpu (the dev extra's jax[tpu])")
from jax.experimental import topologies  # noqa: E402

D = 512
HBM_BYTES = {"v5p": 95e9, "v6e": 32e9}  # per chip
MODELS = {"flash": (64, 128 + 512), "pro": (128, 128 + 1024)}  # H, K
ALL = os.environ.get("DSV4_AOT_ALL") == "1"
CASES = [("v5p:2x2x1", "flash", 65536), ("v6e:2x2", "flash", 65536),
         pytest.param("v5p:2x2x1", "pro", 65536, marks=pytest.mark.skipif(not ALL, reason="DSV4_AOT_ALL=1")),
         pytest.param("v6e:2x2", "pro", 32768, marks=pytest.mark.skipif(not ALL, reason="DSV4_AOT_ALL=1"))]


def _forward(q, kv, sink, idx):
  return pallas_kernels.sparse_attention(q, kv, sink, idx, scale=D ** -0.5, implementation="tpu")


def _forward_backward(q, kv, sink, idx, dout, dlse):
  (out, lse), pullback = jax.vjp(lambda q, kv, sink: _forward(q, kv, sink, idx), q, kv, sink)
  return (out, lse) + pullback((dout, dlse))


def _compile(fn, args):
  with tpu.compile_for_tpu():  # a fresh jit inside: traced for Mosaic although the default backend is the CPU
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _report(label, m, seconds):
  gib = lambda n: f"{n / 2**30:.2f}"
  print(f"\n{label}: argument {gib(m.argument_size_in_bytes)} GiB, output {gib(m.output_size_in_bytes)} GiB, "
        f"temp {gib(m.temp_size_in_bytes)} GiB, alias {gib(m.alias_size_in_bytes)} GiB; compiled in {seconds:.1f} s")


@pytest.mark.parametrize("topology,model,S", CASES)
def test_compiles_with_sane_memory(topology, model, S):
  H, K = MODELS[model]
  T = S + S // 4  # raw window entries + CSA's compressed ones
  device = topologies.get_topology_desc(topology, "tpu").devices[0]
  arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))
  q = arg((1, S, H, D), jnp.bfloat16)
  fwd_args = (q, arg((1, T, D), jnp.bfloat16), arg((H,), jnp.float32), arg((1, S, K), jnp.int32))
  q_bytes, kv_bytes, lse_bytes = S * H * D * 2, T * D * 2, S * max(H, 128) * 4  # lse's lanes pad to 128
  scores_bytes = S * T * 4  # a dense [S, T] float32 score matrix, which must never appear
  hbm = HBM_BYTES[topology.split(":")[0]]

  compiled, seconds = _compile(_forward, fwd_args)
  m = compiled.memory_analysis()
  _report(f"{topology} {model} S={S} forward", m, seconds)
  assert q_bytes + kv_bytes <= m.argument_size_in_bytes <= 1.05 * (q_bytes + kv_bytes) + 4 * S * K
  assert q_bytes <= m.output_size_in_bytes <= q_bytes + lse_bytes + 4096
  assert m.temp_size_in_bytes <= 2 * kv_bytes + 64 * 2**20  # the kv row layout copy, and no more
  assert m.temp_size_in_bytes < scores_bytes / 100

  compiled, seconds = _compile(_forward_backward, fwd_args + (q, arg((1, S, H), jnp.float32)))
  m = compiled.memory_analysis()
  _report(f"{topology} {model} S={S} forward+backward", m, seconds)
  assert m.output_size_in_bytes <= 2 * q_bytes + lse_bytes + kv_bytes + 2**20  # out, lse, dq, dkv, dsink
  # One chunk of dkv contributions + dkv in float32 + kv copies: no [S, T] scores, no [S, K, D] contributions.
  bound = tpu.DKV_CHUNK_BYTES + 2 * T * D * 4 + 2 * kv_bytes + 256 * 2**20
  assert m.temp_size_in_bytes <= bound, (m.temp_size_in_bytes, bound)
  assert m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes < 0.9 * hbm
