"""Tests for the compress Mosaic GPU kernel without a GPU: GPU interpret mode on the CPU against the reference
(packed documents, -1 slots, arbitrary slot lists, f32 / bf16 / mixed inputs, the CSA overlap and none, small
stages that stream ape and keep several stages for the overlap reuse), gradients through the op's custom_vjp
with the kernel forward, the dispatch off GPU, and the Mosaic GPU lowering for CUDA (jax.export builds the whole
kernel module) at the Flash CSA and HCA benchmark shapes. The H200 check: experiments/check_compress_gpu.py.

Poisoning: the interpreter fills fresh buffers (the output and every SMEM scratch) with NaN, so a slot the kernel
fails to write, or a masked row it reads unmasked, fails the finiteness and value checks. Its race detector
watches the bulk copies against the reads (the ring reuses and keeps stage buffers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels
from dsv4_jax.model import kv_format
from pallas_kernels.compress import gpu, reference, vjp
from test_compress_tpu import make_inputs

INTERPRET = plgpu.InterpretGPUParams(detect_races=True)


@pytest.fixture(autouse=True)
def no_races():
  yield
  races = gpu_callbacks._races
  assert races is None or not races.races_found, "the interpreter's race detector flagged a race"


@pytest.fixture
def small_stages(monkeypatch):
  """Stages of 2 rows (f32, c 128, overlap: RC = 2 < m = 4, so the ring keeps H = 2 stages), ape streamed."""
  monkeypatch.setattr(gpu, "STAGE_BYTES", 4096)
  monkeypatch.setattr(gpu, "APE_RESIDENT_BYTES", 0)


def spec_of(ratio, freqs, overlap, out_dtype):
  return reference.Spec(ratio=ratio, overlap=overlap, rope_freqs=tuple(float(f) for f in freqs), eps=1e-6,
                        out_dtype=jnp.dtype(out_dtype).name)


def kernel(args, spec, **kw):
  return jax.jit(lambda a: gpu.compress_gpu(*a, spec, interpret=INTERPRET, **kw))(args)


def check(got, want, rel):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * max(np.abs(want).max(), 1e-3))


def compare(args, ratio, freqs, overlap, out_dtype, **kw):
  spec = spec_of(ratio, freqs, overlap, out_dtype)
  got = kernel(args, spec, **kw)
  want = reference.compress_reference(*args, spec)
  assert got.dtype == jnp.dtype(out_dtype)
  rel = 1e-5 if jnp.dtype(out_dtype) == jnp.float32 else 2e-2  # bf16: one bf16 ulp
  check(got.astype(jnp.float32), want.astype(jnp.float32), rel)
  assert np.all(np.asarray(got)[np.asarray(args[4]) < 0] == 0)
  return got


def drawn(seed, B, S, c, rope, ratio, overlap, cuts, dtype):
  args, freqs = make_inputs(seed, B, S, c, rope, ratio, overlap, cuts, dtype)
  return args, np.asarray(freqs, np.float32)


# (B, S, c, rope, ratio, overlap): c not a multiple of 128 (channel padding), rope 8 / 16 / 32 (r/2 a power of
# two); m = 4 with the overlap (CSA), m = 16 without (HCA-like at test size), m = 8 with the overlap.
SHAPES = [(2, 40, 40, 8, 4, True), (1, 70, 136, 16, 4, True), (1, 100, 72, 16, 16, False), (2, 60, 64, 32, 8, True)]


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES), dtype=st.sampled_from(["float32", "bfloat16"]),
       cuts=st.lists(st.integers(1, 39), max_size=3, unique=True))
def test_matches_reference(seed, shape, dtype, cuts):
  args, freqs = drawn(seed, *shape, cuts=cuts, dtype=dtype)
  compare(args, shape[4], freqs, shape[5], dtype, group=16)


def test_flash_layout_mixed_dtypes_several_ctas():
  """c 256 (vector loads of 2), bf16 kv + f32 score (the benchmark's inputs), packed documents, 3 CTAs per row."""
  args, freqs = drawn(5, 2, 160, 256, 64, 4, True, [13, 70, 71], "bfloat16")
  args = (args[0], args[1].astype(jnp.float32)) + args[2:]
  compare(args, 4, freqs, True, "bfloat16", group=16)


def test_small_stages_keep_several_stages(small_stages):
  args, freqs = drawn(6, 1, 72, 128, 16, 4, True, [21, 40], "float32")
  compare(args, 4, freqs, True, "float32", group=8)


def test_small_stages_stream_ape_without_overlap(small_stages):
  args, freqs = drawn(7, 1, 96, 128, 16, 16, False, [33], "bfloat16")
  compare(args, 16, freqs, False, "bfloat16", group=8)


def test_arbitrary_slots():
  """Slots in no order, repeated, -1 between them, has_prev only where the m rows before exist."""
  args, freqs = drawn(8, 2, 64, 128, 16, 4, True, [], "float32")
  rng = np.random.default_rng(8)
  end = rng.integers(3, 64, size=(2, 24)).astype(np.int32)
  end[:, 5:9] = -1
  end[0, 12:16] = [11, 15, 19, 23]  # a run of consecutive blocks (the reuse) after a gap
  has_prev = (rng.random((2, 24)) < 0.7) & (end >= 7)
  positions = rng.integers(0, 5000, size=(2, 24)).astype(np.int32)
  args = args[:4] + (jnp.asarray(end), jnp.asarray(has_prev), jnp.asarray(positions))
  compare(args, 4, freqs, True, "float32", group=8)


def test_gradients_through_the_vjp(monkeypatch):
  """The kernel forward with the shared backward: the reference's values and gradients."""
  monkeypatch.setitem(vjp._FORWARD, "gpu", functools.partial(gpu.compress_gpu, interpret=INTERPRET))
  args, freqs = drawn(9, 1, 48, 64, 16, 4, True, [17], "float32")
  spec = spec_of(4, freqs, True, "float32")
  w_out = jnp.asarray(np.random.default_rng(9).standard_normal((1, args[4].shape[1], 64)), jnp.float32)

  def loss(impl, kv, sc, ape, w):
    return jnp.sum(vjp.compress_vjp(kv, sc, ape, w, *args[4:], spec, impl) * w_out)

  got = jax.jit(jax.value_and_grad(functools.partial(loss, "gpu"), argnums=(0, 1, 2, 3)))(*args[:4])
  want = jax.jit(jax.value_and_grad(functools.partial(loss, "reference"), argnums=(0, 1, 2, 3)))(*args[:4])
  check(got[0], want[0], 1e-5)
  for a, b in zip(got[1], want[1]):
    check(a, b, 1e-4)


def test_fp8_rows_are_kv_format_of_the_entries():
  args, freqs = drawn(3, 1, 64, 192, 64, 4, True, [9, 50], "float32")
  spec = spec_of(4, freqs, True, "bfloat16")
  rows = kernel(args, spec, fp8=True)
  entries = reference.compress_reference(*args, spec)
  assert rows.dtype == jnp.uint8 and rows.shape == (1, 16, reference.fp8_row_bytes(192, 64))
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(kv_format.pack_entries(entries, 64, "fp8")))


def test_unsupported_rope_is_refused():
  args, freqs = drawn(4, 1, 16, 64, 24, 4, True, [], "float32")
  assert not gpu.supports(64, spec_of(4, freqs, True, "float32"))
  with pytest.raises(ValueError, match="power of two"):
    gpu.compress_gpu(*args, spec_of(4, freqs, True, "float32"), interpret=INTERPRET)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the dispatch off GPU")
def test_dispatch_off_gpu():
  args, freqs = drawn(4, 1, 8, 64, 16, 4, True, [], "float32")
  op = functools.partial(pallas_kernels.compress, ratio=4, rope_freqs=tuple(freqs))
  with pytest.raises(ValueError, match="needs an NVIDIA GPU.*'cpu'"):
    op(*args, implementation="gpu")
  if jax.default_backend() != "tpu":
    np.testing.assert_array_equal(np.asarray(op(*args)), np.asarray(op(*args, implementation="reference")))


@pytest.mark.parametrize("ratio,overlap", [(4, True), (128, False)])
def test_lowers_for_cuda_at_benchmark_shape(ratio, overlap):
  """jax.export for CUDA lowers the whole Mosaic GPU module (not the PTX compile) at S = 128K, c = 512."""
  S, c = 131072, 512
  C = 2 * c if overlap else c
  N = S // ratio
  sds = jax.ShapeDtypeStruct
  shapes = (sds((1, S, C), jnp.bfloat16), sds((1, S, C), jnp.float32), sds((ratio, C), jnp.float32),
            sds((c,), jnp.float32), sds((1, N), jnp.int32), sds((1, N), jnp.bool_), sds((1, N), jnp.int32))
  spec = spec_of(ratio, 1.0 / 10000 ** (np.arange(32) / 32), overlap, "bfloat16")
  exported = jax.export.export(jax.jit(lambda *a: gpu.compress_gpu(*a, spec)), platforms=["cuda"])(*shapes)
  text = exported.mlir_module()
  assert "mosaic_gpu" in text and exported.out_avals[0].shape == (1, N, c)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel needs an NVIDIA Hopper GPU")
@pytest.mark.parametrize("shape", [(2, 160, 256, 64, 4, True), (1, 100, 72, 16, 16, False),
                                   (1, 512, 512, 64, 128, False)])
def test_compiled_kernel_matches_reference(shape):
  B, S, c, rope, ratio, overlap = shape
  args, freqs = drawn(10, B, S, c, rope, ratio, overlap, [13, 70], "bfloat16")
  op = functools.partial(pallas_kernels.compress, ratio=ratio, rope_freqs=tuple(freqs))
  got, want = op(*args, implementation="gpu"), op(*args, implementation="reference")
  check(got.astype(jnp.float32), want.astype(jnp.float32), 2e-2)
