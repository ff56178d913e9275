"""Tests for the GPU path of pallas_kernels.indexer_topk: the Mosaic GPU score kernel lowers for CUDA on any machine
(jax.export builds the whole Mosaic GPU module, not the PTX compile); on an NVIDIA Hopper GPU its scores and the
op's selection are compared with the reference (skipped elsewhere: GPU interpret mode cannot run WGMMA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.indexer_topk import causal_visible_end, gpu
from pallas_kernels.indexer_topk.reference import index_scores, indexer_topk_reference

ON_GPU = jax.default_backend() == "gpu"


def _inputs(B, S, H, D, N, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(k[0], (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
  keys = jax.random.normal(k[1], (B, N, D), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(k[2], (B, S, H), jnp.float32)
  return q, keys, w


@pytest.mark.parametrize("shape", [(1, 16, 64, 128, 2048), (2, 5, 8, 64, 100), (1, 3, 128, 256, 700)])
def test_score_kernel_lowers_for_cuda(shape):
  B, C, H, D, N = shape
  args = (jax.ShapeDtypeStruct((B, C, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, N, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, C, H), jnp.float32), jax.ShapeDtypeStruct((B, C), jnp.int32))
  exported = jax.export.export(jax.jit(gpu.index_scores_gpu), platforms=["cuda"])(*args)
  assert exported.mlir_module().count("mosaic_gpu_v2") == 1
  assert exported.out_avals[0].shape == (B, C, N)


@pytest.mark.parametrize("N,selection", [(1024, "auto"), (4096, "auto"), (1024, "radix")])
def test_the_op_lowers_for_cuda_in_query_chunks(N, selection):
  """The whole GPU path (chunked kernel scores + selection) at a Flash-like chunked shape; "auto" takes
  lax.top_k below gpu.RADIX_MIN_ENTRIES entries and radix select from there (no sort of the chunk)."""
  B, S, H, D = 1, 4096, 64, 128
  args = (jax.ShapeDtypeStruct((B, S, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, N, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, S, H), jnp.float32), jax.ShapeDtypeStruct((B, S), jnp.int32),
          jax.ShapeDtypeStruct((B, S), jnp.int32))
  fn = jax.jit(lambda q, k, w, lo, hi: gpu.indexer_topk_gpu(q, k, w, lo, hi, topk=512, query_chunk=1024,
                                                            selection=selection))
  exported = jax.export.export(fn, platforms=["cuda"])(*args)
  assert [a.shape for a in exported.out_avals] == [(B, S, 512), (B, S, 512)]
  module = exported.mlir_module()
  assert "mosaic_gpu_v2" in module
  radix = selection == "radix" or N >= gpu.RADIX_MIN_ENTRIES
  assert ("mhlo.topk" in module or "chlo.top_k" in module) != radix  # a sort of the chunk only without radix


def test_unknown_selection_is_named():
  q, k, w = _inputs(1, 4, 8, 64, 16)
  lo = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="selection='heap'"):
    gpu.indexer_topk_gpu(q, k, w, lo, lo + 4, topk=2, selection="heap")


def test_unsupported_head_shape_is_named():
  q, k, w = _inputs(1, 4, 8, 96, 16)
  with pytest.raises(ValueError, match="multiple of 64"):
    gpu.index_scores_gpu(q, k, w, jnp.full((1, 4), 16, jnp.int32))


@pytest.mark.skipif(not ON_GPU, reason="the Mosaic GPU kernel needs an NVIDIA Hopper GPU")
@pytest.mark.parametrize("shape", [(1, 16, 64, 128, 2048), (2, 5, 8, 64, 100), (1, 3, 128, 256, 700)])
def test_score_kernel_matches_reference(shape):
  B, C, H, D, N = shape
  q, k, w = _inputs(B, C, H, D, N)
  end = jnp.full((B, C), N, jnp.int32)
  got = np.asarray(gpu.index_scores_gpu(q, k, w, end))
  want = np.asarray(index_scores(q.astype(jnp.float32), k.astype(jnp.float32), w))
  assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.skipif(not ON_GPU, reason="the Mosaic GPU kernel needs an NVIDIA Hopper GPU")
def test_gpu_selection_matches_reference():
  """Causal visibility (entries complete by each position, m = 4) and a document start: the same picks as the
  reference wherever the scores are not near-ties (float32 summation order may swap those)."""
  B, S, H, D, m, topk = 1, 256, 64, 128, 4, 32
  q, k, w = _inputs(B, S, H, D, S // m)
  end = causal_visible_end(jnp.arange(S)[None], m)
  start = jnp.where(jnp.arange(S)[None] >= 128, 128 // m, 0).astype(jnp.int32)
  got_i, got_v = pallas_kernels.indexer_topk(q, k, w, end, visible_start=start, topk=topk, implementation="gpu")
  want_i, want_v = indexer_topk_reference(q, k, w, start, end, topk=topk)
  agree = np.mean(np.asarray(got_i) == np.asarray(want_i))
  assert agree > 0.99, agree
  finite = np.isfinite(np.asarray(want_v))
  assert np.array_equal(np.isfinite(np.asarray(got_v)), finite)
  np.testing.assert_allclose(np.asarray(got_v)[finite], np.asarray(want_v)[finite], rtol=1e-3, atol=1e-3)
