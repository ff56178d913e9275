"""Tests for the GPU implementation of pallas_kernels.sparse_attention: its dispatch and its XLA backward run
anywhere; the Mosaic GPU forward kernel runs only on an NVIDIA Hopper GPU (skipped elsewhere: GPU interpret mode
cannot run WGMMA; the H200 figures are in experiments/results/kernels.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.sparse_attention import gpu_bwd, vjp
from pallas_kernels.sparse_attention.reference import sparse_attention_reference

ON_GPU = jax.default_backend() == "gpu"


def _inputs(B=2, S=37, H=8, D=128, T=50, K=40, seed=0, dtype=jnp.bfloat16):
  k = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(k[0], (B, S, H, D), jnp.float32).astype(dtype)
  kv = jax.random.normal(k[1], (B, T, D), jnp.float32).astype(dtype)
  sink = jax.random.normal(k[2], (H,), jnp.float32)
  # distinct indices per query (a permutation prefix), some -1
  perm = jnp.argsort(jax.random.uniform(k[3], (B, S, T)), axis=-1)[..., :K].astype(jnp.int32)
  drop = jax.random.bernoulli(k[4], 0.2, perm.shape)
  return q, kv, sink, jnp.where(drop, -1, perm)


@pytest.mark.skipif(ON_GPU, reason="checks the error off GPU")
def test_gpu_implementation_off_gpu_names_the_backend():
  q, kv, sink, idx = _inputs()
  with pytest.raises(ValueError, match="needs an NVIDIA GPU.*'cpu'"):
    pallas_kernels.sparse_attention(q, kv, sink, idx, scale=0.1, implementation="gpu")


def test_auto_off_gpu_and_tpu_is_the_reference():
  q, kv, sink, idx = _inputs()
  if jax.default_backend() in ("gpu", "tpu"):
    pytest.skip("auto picks a kernel here")
  got = pallas_kernels.sparse_attention(q, kv, sink, idx, scale=0.1)
  want = sparse_attention_reference(q, kv, sink, idx, scale=0.1)
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))


def test_bf16_backward_matches_the_exact_backward():
  """The GPU path's backward (bf16 matmul operands, f32 accumulation) against the float32 one."""
  q, kv, sink, idx = _inputs()
  out, lse = sparse_attention_reference(q, kv, sink, idx, scale=0.1)
  k = jax.random.split(jax.random.key(9), 2)
  dout = jax.random.normal(k[0], out.shape, jnp.float32).astype(out.dtype)
  delta = jnp.einsum("BSHD,BSHD->BSH", dout.astype(jnp.float32), out.astype(jnp.float32))
  exact = vjp.reference_bwd(q, kv, idx, dout, lse, delta, scale=0.1)
  fast = vjp.reference_bwd(q, kv, idx, dout, lse, delta, scale=0.1, query_chunk=16, operand_dtype=jnp.bfloat16)
  for got, want, name in zip(fast, exact, ("dq", "dkv")):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 2e-2, (name, rel)
  assert np.linalg.norm(np.asarray(fast[1]) - np.asarray(exact[1])) > 0


@pytest.mark.skipif(not ON_GPU, reason="the Mosaic GPU kernel needs an NVIDIA Hopper GPU")
@pytest.mark.parametrize("shape", [(1, 5, 64, 512, 300, 200), (2, 3, 8, 128, 40, 70), (1, 4, 128, 512, 900, 640)])
@pytest.mark.parametrize("variant", [{}, {"split": "none"}, {"gather": "tma"}])
def test_gpu_kernel_matches_reference(shape, variant):
  from pallas_kernels.sparse_attention.gpu import sparse_attention_gpu  # noqa: PLC0415
  B, S, H, D, T, K = shape
  q, kv, sink, idx = _inputs(B, S, H, D, T, K)
  if variant:
    out, lse = sparse_attention_gpu(q, kv, sink, idx, scale=D ** -0.5, **variant)
  else:
    out, lse = pallas_kernels.sparse_attention(q, kv, sink, idx, scale=D ** -0.5, implementation="gpu")
  ro, rl = sparse_attention_reference(q.astype(jnp.float32), kv.astype(jnp.float32), sink, idx, scale=D ** -0.5)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ro), atol=1e-2)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(rl), atol=1e-4)


def _bwd_case(B, S, H, D, T, K, seed=0):
  """Inputs and cotangent terms of one backward, from the float32 reference forward."""
  q, kv, sink, idx = _inputs(B, S, H, D, T, K, seed=seed)
  scale = D ** -0.5
  out, lse = sparse_attention_reference(q, kv, sink, idx, scale=scale)
  dout = jax.random.normal(jax.random.key(seed + 7), out.shape, jnp.float32).astype(out.dtype)
  delta = jnp.einsum("BSHD,BSHD->BSH", dout.astype(jnp.float32), out.astype(jnp.float32))
  return q, kv, idx, dout, lse, delta, scale


NEEDS_REFS = pytest.mark.skipif(not gpu_bwd.SUPPORTED, reason="the backward kernel needs jax >= 0.11 (mutable refs)")


@NEEDS_REFS
@pytest.mark.parametrize("shape", [(1, 8, 64, 512, 1024, 640), (2, 5, 8, 128, 50, 70), (1, 3, 128, 512, 900, 1024),
                                   (2, 40000, 8, 128, 64, 64)])  # the last: B·S rows over CUDA's 65535 grid cap
def test_backward_kernel_lowers_for_cuda(shape):
  """jax.export for CUDA lowers the whole Mosaic GPU backward module (not the PTX compile) at production head
  shapes, with dkv a float32 buffer threaded through the kernel as a mutable ref."""
  B, S, H, D, T, K = shape
  args = (jax.ShapeDtypeStruct((B, S, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, S, K), jnp.int32), jax.ShapeDtypeStruct((B, S, H, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, S, H), jnp.float32), jax.ShapeDtypeStruct((B, S, H), jnp.float32))
  backward = jax.jit(lambda *a: gpu_bwd.sparse_attention_gpu_bwd(*a, scale=0.05))
  exported = jax.export.export(backward, platforms=["cuda"])(*args)
  assert exported.mlir_module().count("mosaic_gpu_v2") == 1
  assert [a.shape for a in exported.out_avals] == [(B, S, H, D), (B, T, D)]
  assert [a.dtype for a in exported.out_avals] == [jnp.bfloat16, jnp.float32]


@NEEDS_REFS
@pytest.mark.skipif(not ON_GPU, reason="the Mosaic GPU kernel needs an NVIDIA Hopper GPU")
@pytest.mark.parametrize("shape", [(1, 6, 64, 512, 700, 640), (2, 37, 8, 128, 50, 40), (1, 4, 128, 512, 900, 1024),
                                   (2, 9, 16, 192, 300, 70)])
def test_backward_kernel_matches_reference(shape):
  """dq and dkv of the Mosaic GPU backward against the float32 reference backward (16-bit operands: ~1e-2)."""
  q, kv, idx, dout, lse, delta, scale = _bwd_case(*shape)
  got = gpu_bwd.sparse_attention_gpu_bwd(q, kv, idx, dout, lse, delta, scale=scale)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  want = vjp.reference_bwd(f32(q), f32(kv), idx, f32(dout), lse, delta, scale=scale)
  for g, w, name in zip(got, want, ("dq", "dkv")):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.isfinite(g).all(), name
    assert np.linalg.norm(g - w) / np.linalg.norm(w) < 2e-2, name


@NEEDS_REFS
def test_backward_kernel_lowers_inside_shard_map_and_remat():
  """The model's multi-device path: grad through a rematerialized op inside shard_map (kernel_sharding's wrapper),
  with the backward's mutable dkv ref created inside the custom_vjp's bwd; lowered for CUDA."""
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  idx_spec = jax.ShapeDtypeStruct((2, 8, 128), jnp.int32)

  def loss(q, kv, sink, idx):
    attend = jax.checkpoint(lambda q, kv, sink: vjp.sparse_attention_vjp(q, kv, sink, idx, 0.05, "gpu"))
    out, lse = attend(q, kv, sink)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  spec = jax.sharding.PartitionSpec
  grads = jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh,
                        in_specs=(spec("data"), spec("data"), spec(), spec("data")),
                        out_specs=(spec("data"), spec("data"), spec()), check_vma=False)
  args = (jax.ShapeDtypeStruct((2, 8, 64, 512), jnp.bfloat16), jax.ShapeDtypeStruct((2, 256, 512), jnp.bfloat16),
          jax.ShapeDtypeStruct((64,), jnp.float32), idx_spec)
  shard = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, s))  # noqa: E731
  args = tuple(shard(a, s) for a, s in zip(args, (spec("data"), spec("data"), spec(), spec("data"))))
  exported = jax.export.export(jax.jit(grads), platforms=["cuda"])(*args)
  assert exported.mlir_module().count("mosaic_gpu_v2") >= 2  # the forward kernel and the backward kernel
  assert [a.shape for a in exported.out_avals] == [(2, 8, 64, 512), (2, 256, 512), (64,)]
