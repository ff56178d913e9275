"""Ahead-of-time TPU compiles of the indexer top-k kernel from this CPU host (libtpu's Mosaic and XLA:TPU
compilers: lowering errors and VMEM overflows fail here) for v5p and v6e, at production shapes, with the memory
figures of `compiled.memory_analysis()`.

Forward, and forward + backward as training runs it (jax.vjp of the selected scores in one jit), per device,
batch 1, index heads H = 64, index dim 128, ratio 4 (N = S/4 entries), bf16 q/k/w. In CI: Flash (top-512) at
S = 64K on each topology. With DSV4_AOT_ALL=1 also Pro (top-1024) at 64K. The [S, N] float32 score matrix
(4 GiB at 64K) must never appear: temp stays below 1/10 of it.

Measured (jax 0.11.2 / its libtpu, S = 64K): forward temp 96 MiB on v5p, 32 MiB on v6e (w in float32 and
layout copies); forward + backward temp 405 MiB (one backward chunk of 512 queries' gathered keys, logits and
key contributions, plus dk); the same for top-1024. Compiles take 3-13 s each.
"""

from __future__ import annotations

from aot_util import abstract_arg, compile_tpu, hbm_bytes, only_all  # first: sets libtpu's env

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels.indexer_topk import vjp

H, D, RATIO = 64, 128, 4
CASES = [("v5p:2x2x1", 512, 65536), ("v6e:2x2", 512, 65536),
         pytest.param("v5p:2x2x1", 1024, 65536, marks=only_all), pytest.param("v6e:2x2", 1024, 65536, marks=only_all)]


def _forward(topk):
  return lambda q, k, w, end: pallas_kernels.indexer_topk(q, k, w, end, topk=topk, implementation="tpu")


def _forward_backward(topk):
  def fn(q, k, w, end, dscores):
    (idx, scores), pullback = jax.vjp(lambda q, k, w: _forward(topk)(q, k, w, end), q, k, w)
    return (idx, scores) + pullback((jnp.zeros(idx.shape, jax.dtypes.float0), dscores))
  return fn


@pytest.mark.parametrize("topology,topk,S", CASES)
def test_compiles_with_sane_memory(topology, topk, S):
  N = S // RATIO
  arg = abstract_arg(topology)
  args = (arg((1, S, H, D), jnp.bfloat16), arg((1, N, D), jnp.bfloat16), arg((1, S, H), jnp.bfloat16),
          arg((1, S), jnp.int32))
  in_bytes = S * H * D * 2 + N * D * 2 + S * H * 2 + S * 4
  out_bytes = S * topk * 8  # indices int32 + scores float32
  scores_bytes = S * N * 4  # the dense [S, N] score matrix, which must never appear
  hbm = hbm_bytes(topology)

  m = compile_tpu(f"{topology} top-{topk} S={S} forward", _forward(topk), args, unit="MiB", digits=1)
  assert in_bytes <= m.argument_size_in_bytes <= 1.01 * in_bytes
  assert out_bytes <= m.output_size_in_bytes <= out_bytes + 4096
  kp = max(128, topk)
  # w in float32 and the kernel's padded outputs (sliced to topk): nothing of size S·N.
  assert m.temp_size_in_bytes <= S * H * 4 + 2 * S * kp * 4 + 16 * 2**20
  assert m.temp_size_in_bytes < scores_bytes / 20

  m = compile_tpu(f"{topology} top-{topk} S={S} forward+backward", _forward_backward(topk),
                  args + (arg((1, S, topk), jnp.float32),), unit="MiB", digits=1)
  assert m.output_size_in_bytes <= out_bytes + in_bytes + 2**20  # indices, scores, dq, dk, dw
  # One backward chunk: gathered keys, logits, dl and key contributions [C, K, D] in float32, plus dk in
  # float32 and the forward's temps; no [S, N] scores.
  C = max(1, vjp.BWD_BUDGET // (H * topk))
  chunk_bytes = C * topk * D * 4 * 2 + C * H * topk * 4 * 3
  bound = chunk_bytes + N * D * 4 + S * H * 4 * 2 + 2 * S * kp * 4 + S * H * D * 4 + 256 * 2**20
  assert m.temp_size_in_bytes <= bound, (m.temp_size_in_bytes, bound)
  assert m.temp_size_in_bytes < scores_bytes / 10
  assert m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes < 0.9 * hbm
