"""Ahead-of-time TPU compiles of the sparse-attention kernels from this CPU host: libtpu's real Mosaic and XLA:TPU
compilers (lowering errors and VMEM overflows fail here) for v5p and v6e topologies, at production shapes, with
the memory figures of `compiled.memory_analysis()`.

Forward, and forward + backward as training runs them (jax.vjp in one jit), per device, batch 1, D = 512, bf16.
In CI: Flash (H=64, K = 128 window + 512 top-k) at S = 64K on each topology. With DSV4_AOT_ALL=1 also Pro
(H=128, K = 128 + 1024): 64K on v5p, 32K on v6e (at 64K its q, out, dO and dq alone exceed v6e's 32 GB).
"""

from __future__ import annotations

from aot_util import abstract_arg, compile_tpu, hbm_bytes, only_all  # first: sets libtpu's env

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels.sparse_attention import tpu

D = 512
MODELS = {"flash": (64, 128 + 512), "pro": (128, 128 + 1024)}  # H, K
CASES = [("v5p:2x2x1", "flash", 65536), ("v6e:2x2", "flash", 65536),
         pytest.param("v5p:2x2x1", "pro", 65536, marks=only_all), pytest.param("v6e:2x2", "pro", 32768, marks=only_all)]


def _forward(q, kv, sink, idx):
  return pallas_kernels.sparse_attention(q, kv, sink, idx, scale=D ** -0.5, implementation="tpu")


def _forward_backward(q, kv, sink, idx, dout, dlse):
  (out, lse), pullback = jax.vjp(lambda q, kv, sink: _forward(q, kv, sink, idx), q, kv, sink)
  return (out, lse) + pullback((dout, dlse))


@pytest.mark.parametrize("topology,model,S", CASES)
def test_compiles_with_sane_memory(topology, model, S):
  H, K = MODELS[model]
  T = S + S // 4  # raw window entries + CSA's compressed ones
  arg = abstract_arg(topology)
  q = arg((1, S, H, D), jnp.bfloat16)
  fwd_args = (q, arg((1, T, D), jnp.bfloat16), arg((H,), jnp.float32), arg((1, S, K), jnp.int32))
  q_bytes, kv_bytes, lse_bytes = S * H * D * 2, T * D * 2, S * max(H, 128) * 4  # lse's lanes pad to 128
  scores_bytes = S * T * 4  # a dense [S, T] float32 score matrix, which must never appear
  hbm = hbm_bytes(topology)

  m = compile_tpu(f"{topology} {model} S={S} forward", _forward, fwd_args)
  assert q_bytes + kv_bytes <= m.argument_size_in_bytes <= 1.05 * (q_bytes + kv_bytes) + 4 * S * K
  assert q_bytes <= m.output_size_in_bytes <= q_bytes + lse_bytes + 4096
  assert m.temp_size_in_bytes <= 2 * kv_bytes + 64 * 2**20  # the kv row layout copy, and no more
  assert m.temp_size_in_bytes < scores_bytes / 100

  m = compile_tpu(f"{topology} {model} S={S} forward+backward", _forward_backward,
                  fwd_args + (q, arg((1, S, H), jnp.float32)))
  assert m.output_size_in_bytes <= 2 * q_bytes + lse_bytes + kv_bytes + 2**20  # out, lse, dq, dkv, dsink
  # One chunk of dkv contributions + dkv in float32 + kv copies: no [S, T] scores, no [S, K, D] contributions.
  bound = tpu.DKV_CHUNK_BYTES + 2 * T * D * 4 + 2 * kv_bytes + 256 * 2**20
  assert m.temp_size_in_bytes <= bound, (m.temp_size_in_bytes, bound)
  assert m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes < 0.9 * hbm
