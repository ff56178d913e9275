"""Tests for pallas_kernels.paged_index_scores: the MXFP4 row decoding, the reference against numpy (page
addressing included), input errors, and the Mosaic GPU kernel's CUDA lowering (any machine) and results
(NVIDIA Hopper only)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

from pallas_kernels import paged_index_scores
from pallas_kernels.paged_index_scores import fp4, gpu
from pallas_kernels.paged_index_scores.reference import paged_index_scores_reference

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)
on_hopper = jax.default_backend() == "gpu" and "H" in jax.devices()[0].device_kind.upper()


def random_pages(rng, n_pages, K, d=128, scale_range=(118, 134)):
  codes = rng.integers(0, 256, (n_pages, K, d // 2), dtype=np.uint8)
  scales = rng.integers(*scale_range, (n_pages, K, d // 32), dtype=np.uint8)
  return np.concatenate([codes, scales], axis=-1)


def decode_np(rows, d=128):
  """float64 keys of packed rows by table lookup (independent of fp4's arithmetic)."""
  half = d // 2
  lo, hi = rows[..., :half] & 15, rows[..., :half] >> 4
  vals = np.stack([E2M1[lo], E2M1[hi]], axis=-1).reshape(*rows.shape[:-1], d)
  scale = 2.0 ** (rows[..., half:].astype(np.float64) - 127)
  return vals * np.repeat(scale, 32, axis=-1)


def scores_np(q, w, pages, table):
  """float64 I[b, s, n] with q rounded to bf16 as the op sees it."""
  q = np.asarray(jnp.asarray(q).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  keys = decode_np(pages[np.maximum(table, 0)])  # [B, P, K, d]
  keys = keys.reshape(keys.shape[0], -1, keys.shape[-1])
  logits = np.einsum("bshd,bnd->bshn", q, keys)
  return np.einsum("bshn,bsh->bsn", np.maximum(logits, 0), np.asarray(w, np.float64))


def case(seed, B=3, S=1, H=64, K=64, P=5, spare=3):
  rng = np.random.default_rng(seed)
  n_pages = B * P + spare
  pages = random_pages(rng, n_pages, K)
  table = rng.permutation(n_pages)[:B * P].reshape(B, P).astype(np.int32)
  table[0, -1] = -1  # a missing page: read as page 0
  q = rng.standard_normal((B, S, H, 128)).astype(np.float32)
  w = rng.standard_normal((B, S, H)).astype(np.float32)
  return (jnp.asarray(q, jnp.bfloat16), jnp.asarray(w), jnp.asarray(pages), jnp.asarray(table)), (q, w, pages,
                                                                                                   table)


def test_unpack_equals_table_decode():
  # scales 2^-124 .. 2^125: every value a normal float32 (XLA flushes subnormals; pack_keys never writes them)
  rows = random_pages(np.random.default_rng(0), 7, 16, scale_range=(3, 253))
  got = np.asarray(fp4.unpack(jnp.asarray(rows), 128, jnp.float32), np.float64)
  np.testing.assert_array_equal(got, decode_np(rows))
  assert np.signbit(got[decode_np(rows) == 0]).tolist() == np.signbit(decode_np(rows)[decode_np(rows) == 0]).tolist()


@pytest.mark.parametrize("K,S,H", [(64, 1, 64), (32, 2, 48), (16, 1, 8), (128, 3, 64)])
def test_reference_against_numpy(K, S, H):
  args, (q, w, pages, table) = case(K + S, S=S, H=H, K=K)
  got = np.asarray(jax.jit(paged_index_scores_reference)(*args))
  want = scores_np(q, w, pages, table)
  assert got.shape == want.shape == (3, S, table.shape[1] * K)
  # keys are exact in bf16; q·k accumulates in float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_key_n_is_slot_n_mod_K_of_page_n_div_K():
  K, P = 16, 4
  pages = np.zeros((9, K, 68), np.uint8)
  pages[..., 64:] = 127  # scale 1
  pages[6, 5, 0] = 0x02  # page 6, slot 5: dim 0 = 1.0
  table = np.array([[3, 8, 6, 1], [6, 0, 2, 4]], np.int32)
  q = np.zeros((2, 1, 1, 128), np.float32)
  q[..., 0] = 1.0
  got = np.asarray(paged_index_scores(jnp.asarray(q), jnp.ones((2, 1, 1)), jnp.asarray(pages), jnp.asarray(table),
                                      implementation="reference"))
  assert np.argwhere(got != 0).tolist() == [[0, 0, 2 * K + 5], [1, 0, 0 * K + 5]]


def test_bad_inputs_name_the_problem():
  args, _ = case(1)
  q, w, pages, table = args
  with pytest.raises(ValueError, match="implementation"):
    paged_index_scores(q, w, pages, table, implementation="tpu")
  with pytest.raises(ValueError, match="w must be"):
    paged_index_scores(q, w[:, :, :3], pages, table)
  with pytest.raises(ValueError, match="uint8 rows of 68 bytes"):
    paged_index_scores(q, w, pages[..., :64], table)
  with pytest.raises(ValueError, match="page_table"):
    paged_index_scores(q, w, pages, table[:2])
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      paged_index_scores(q, w, pages, table, implementation="gpu")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU, auto is the kernel")
def test_auto_off_gpu_is_the_reference():
  args, _ = case(2)
  got = paged_index_scores(*args, implementation="auto")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(paged_index_scores_reference(*args)))


def test_supports():
  assert gpu.supports(128, 64, 64, 64) and gpu.supports(128, 256, 32, 1)
  assert not gpu.supports(64, 64, 64, 1) and not gpu.supports(128, 320, 64, 1)
  assert not gpu.supports(128, 64, 16, 1) and not gpu.supports(128, 64, 64, 70000)


@pytest.mark.parametrize("B,S,H,K,P", [(4, 1, 64, 64, 8), (2, 2, 48, 32, 5), (1, 1, 64, 128, 3)])
def test_gpu_kernel_lowers_for_cuda(B, S, H, K, P):
  """The Mosaic GPU kernel traces and lowers to a CUDA module on any machine (no GPU needed)."""
  args = (jax.ShapeDtypeStruct((B, S, H, 128), jnp.bfloat16), jax.ShapeDtypeStruct((B, S, H), jnp.float32),
          jax.ShapeDtypeStruct((B * P + 1, K, 68), jnp.uint8), jax.ShapeDtypeStruct((B, P), jnp.int32))
  exported = export.export(gpu.paged_index_scores_gpu, platforms=["cuda"])(*args)
  assert "mosaic_gpu" in exported.mlir_module()
  assert exported.out_avals[0].shape == (B, S, P * K)


def test_run_starts_address_every_run():
  table = jnp.array([[2, -1, 7], [5, 1, 0]], jnp.int32)
  for K in (32, 64, 128, 256):
    n_cta = -(-3 * K // (gpu.TILES * gpu.TILE))
    starts = np.asarray(gpu.run_starts(table, K, n_cta))
    run = min(K, gpu.TILE)
    keys = np.arange(n_cta * gpu.TILES * gpu.TILE // run) * run
    slot = keys // K
    for b in range(2):
      page = np.where(slot < 3, np.asarray(table)[b, np.minimum(slot, 2)], 0)
      want = (np.maximum(page, 0) * K + keys % K) // gpu.QUAD
      assert starts[b][:, :gpu.TILES * gpu.TILE // run].reshape(-1).tolist() == want.tolist(), K  # less padding


def test_kernel_bit_placement_model():
  """A numpy model of the kernel's integer decoding (gpu._dequant_tile's `pair`: both codes of a pair in one
  32-bit word, placed as bf16 bits) equals the table decode for every byte pair and scale byte 2..252."""
  u = np.arange(1 << 16, dtype=np.uint32)
  for shift in (0, 4):  # the even (low nibble) and odd (high nibble) halves
    x = (u >> shift) & 0x0F0F
    z = (x & 0xF) | ((x & 0xF00) << 8)
    mag = z & 0x70007
    half = mag & ~((mag >> 1) | (mag >> 2)) & 0x10001
    nonzero = (mag | (mag >> 1) | (mag >> 2)) & 0x10001
    want_pair = np.stack([E2M1[x & 0xF], E2M1[(x >> 8) & 0xF]], -1)
    for S in range(2, 253):
      bits = ((mag << 6) + (((S - 1) << 7) * 0x10001) - (half << 6)) & (nonzero * 0xFFFF)
      bits = (bits | ((z & 0x80008) << 12)).astype(np.uint32)
      got = bits.view(np.uint16).reshape(-1, 2).view(ml_dtypes.bfloat16).astype(np.float64)
      want = want_pair * 2.0 ** (S - 127)
      assert np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want)), (shift, S)


@pytest.mark.skipif(not on_hopper, reason="the Mosaic GPU kernel runs on an NVIDIA Hopper GPU")
@pytest.mark.parametrize("K,S,H", [(64, 1, 64), (32, 2, 48), (128, 1, 64), (256, 1, 64)])
def test_gpu_kernel_equals_reference(K, S, H):
  args, _ = case(K, B=5, S=S, H=H, K=K, P=11)
  want = np.asarray(paged_index_scores_reference(*args))
  got = np.asarray(paged_index_scores(*args, implementation="gpu"))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  pytest.main([__file__, "-q"])
