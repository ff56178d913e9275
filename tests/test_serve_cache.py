"""Tests for the inference cache: the spec §8.1 entry layout (against ml_dtypes and the checkpoint FP4 packer),
allocated bytes == accounting (`dsv4 info`), page allocation, and slot prefill / copy / reset on a tiny model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax import accounting
from dsv4_jax.config import ModelConfig
from dsv4_jax.model import kv_format as kvf
from dsv4_jax.model import quant
from dsv4_jax.model.cache import allocate_pages, init_cache
from dsv4_jax.model.transformer import layer_plan
from dsv4_jax.serve.cache import cache_bytes, copy_slot, reset_slot
from dsv4_jax.serve.steps import make_decode, make_prefill


def _entries(n, dim, seed=0):
  """Entries with blocks of every magnitude: tiny (under the amax floor), zero, normal, large."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, dim)) * np.exp(rng.uniform(-12, 8, (n, 1)))
  x[0] = 0.0
  x[1, :64] = 1e-7
  return x.astype(np.float32)


# ----- entry layout --------------------------------------------------------------------------------------
def test_fp8_entry_layout_is_the_584_byte_row():
  x = _entries(64, 512)
  rows = np.asarray(kvf.pack_entries(jnp.asarray(x), 64, "fp8"))
  assert rows.shape == (64, 584) and rows.dtype == np.uint8
  nope, rope = x[:, :448].reshape(64, 7, 64), x[:, 448:]
  amax = np.maximum(np.abs(nope).max(-1), np.float32(quant.FP8_AMAX_FLOOR))
  scale = np.exp2(np.ceil(np.log2(amax.astype(np.float64) / 448.0))).astype(np.float32)
  codes = (nope / scale[..., None]).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).reshape(64, 448)
  np.testing.assert_array_equal(rows[:, :448], codes)
  np.testing.assert_array_equal(rows[:, 448:576], rope.astype(ml_dtypes.bfloat16).view(np.uint8))
  np.testing.assert_array_equal(rows[:, 576:583], (np.log2(scale) + 127).astype(np.uint8))
  assert np.all(rows[:, 583] == 0)
  # Read back: the QAT simulation's FP8 values on the NoPE dims, bf16-rounded RoPE dims.
  back = np.asarray(kvf.unpack_entries(jnp.asarray(rows), 512, 64, "fp8", jnp.float32))
  np.testing.assert_array_equal(back[:, :448], np.asarray(quant.fp8_e4m3_qdq(jnp.asarray(x[:, :448]), 64)))
  np.testing.assert_array_equal(back[:, 448:], rope.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_fp8_storage_is_exact_for_qat_entries():
  """An entry the QAT simulation produced (bf16 activations) is stored and read back bit for bit."""
  x = jnp.asarray(_entries(64, 512, seed=1)).astype(jnp.bfloat16)
  qat = jnp.concatenate([quant.fp8_e4m3_qdq(x[:, :448], 64), x[:, 448:]], axis=-1)
  back = kvf.unpack_entries(kvf.pack_entries(qat, 64, "fp8"), 512, 64, "fp8", jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(qat, np.float32))


def test_fp4_indexer_keys_match_the_checkpoint_packing():
  x = _entries(32, 128, seed=2)
  rows = np.asarray(kvf.pack_keys(jnp.asarray(x), "fp8"))
  assert rows.shape == (32, 68) and rows.dtype == np.uint8  # 64 B of e2m1 pairs + 4 ue8m0 scales
  packed, scales = quant.quant_fp4_packed(x, 32)  # host packer: low nibble = even column
  np.testing.assert_array_equal(rows[:, :64], packed.view(np.uint8))
  np.testing.assert_array_equal(rows[:, 64:], scales.view(np.uint8))
  back = np.asarray(kvf.unpack_keys(jnp.asarray(rows), 128, "fp8", jnp.float32))
  np.testing.assert_array_equal(back, np.asarray(quant.fp4_e2m1_qdq(jnp.asarray(x), 32)))
  np.testing.assert_array_equal(back, quant.dequant_fp4_packed(packed, scales, 32))


@pytest.mark.parametrize("fmt, dtype", [("bf16", jnp.bfloat16), ("float32", jnp.float32)])
def test_plain_formats(fmt, dtype):
  x = jnp.asarray(_entries(4, 128))
  assert kvf.pack_entries(x, 64, fmt).dtype == dtype and kvf.pack_keys(x, fmt).dtype == dtype
  assert kvf.entry_width(ModelConfig.preset("tiny"), fmt) == (128, jnp.dtype(dtype))
  if fmt == "float32":
    np.testing.assert_array_equal(np.asarray(kvf.unpack_entries(kvf.pack_entries(x, 64, fmt), 128, 64, fmt,
                                                                jnp.float32)), np.asarray(x))
  with pytest.raises(ValueError, match="kv_format"):
    kvf.pack_entries(x, 64, "fp16")


# ----- bytes == accounting ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, context", [("flash", 1 << 20), ("pro", 1 << 20), ("tiny", 512), ("tiny-pro", 384),
                                           ("flash", 128)])
@pytest.mark.parametrize("fmt", accounting.KV_FORMATS)
def test_cache_bytes_equal_accounting(name, context, fmt):
  cfg = ModelConfig.preset(name)
  batch = 3
  shapes = jax.eval_shape(lambda: init_cache(cfg, layer_plan(cfg), batch, context, kv_format=fmt, page_tokens=128))
  got, want = cache_bytes(shapes), accounting.kv_cache(cfg, context, fmt)
  assert (got.window, got.compressed, got.indexer) == (batch * want.window, batch * want.compressed,
                                                       batch * want.indexer)
  assert got.compressor_state == batch * want.compressor_state
  assert got.per_token == want.per_token
  if name == "flash" and context == 1 << 20 and fmt == "fp8":
    assert round(got.per_sequence / 2**30, 2) == 3.43  # spec §8.3


def test_allocated_arrays_and_defaults():
  cfg = ModelConfig.preset("tiny")
  cache = init_cache(cfg, layer_plan(cfg), 2, 300)
  assert cache.page_tokens == 256 and cache.max_pages == 2 and cache.num_pages == 4
  assert cache_bytes(cache).window == 2 * accounting.kv_cache(cfg, 300).window
  with pytest.raises(ValueError, match="page_tokens"):
    init_cache(cfg, layer_plan(cfg), 2, 300, page_tokens=100)
  with pytest.raises(ValueError, match="kv_format"):
    init_cache(cfg, layer_plan(cfg), 2, 300, kv_format="fp4")


# ----- pages --------------------------------------------------------------------------------------------
def test_allocate_pages_pops_the_free_stack_and_flags_overflow():
  cfg = ModelConfig.preset("tiny")
  cache = init_cache(cfg, layer_plan(cfg), 3, 512, page_tokens=128, num_pages=5)
  table = jnp.asarray([[-1] * 4, [0, -1, -1, -1], [-1] * 4], jnp.int32)
  free = jnp.asarray([4, 3, 2, 1, 0], jnp.int32)  # page 0 is taken: 4 free, top of stack = index 3 (page 1)
  cache = cache.replace(free_pages=free, num_free=jnp.asarray(4))
  table2, _, num_free, overflow = allocate_pages(cache, table, jnp.asarray([130, 200, 0]))
  np.testing.assert_array_equal(table2, [[1, 2, -1, -1], [0, 3, -1, -1], [-1] * 4])
  assert int(num_free) == 1 and not bool(overflow)
  _, _, num_free, overflow = allocate_pages(cache, table, jnp.asarray([300, 129, 0]))  # 3 + 1 pages: all
  assert int(num_free) == 0 and not bool(overflow)
  _, _, num_free, overflow = allocate_pages(cache, table, jnp.asarray([512, 129, 0]))  # 4 + 1 > 4
  assert bool(overflow) and int(num_free) == 0
  _, _, _, overflow = allocate_pages(cache, table, jnp.asarray([513, 0, 0]))  # past max_len
  assert bool(overflow)


# ----- slots on a tiny model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slot_setup(tiny_model):
  cfg = tiny_model.cfg
  rng = np.random.default_rng(5)
  seqs = rng.integers(0, cfg.vocab_size, (4, 160)).astype(np.int32)
  seqs[1, :150] = seqs[0, :150]  # seqs 0 and 1: one prompt (150 tokens) with different continuations
  seqs[2, :151] = seqs[1, :151]
  logits = np.asarray(jax.jit(lambda t: tiny_model(t, with_mtp=False).logits)(jnp.asarray(seqs)))
  return tiny_model, seqs, logits, make_prefill(tiny_model), make_decode(tiny_model)


def _close(got, want, tol=1e-4):
  got, want = np.asarray(got), np.asarray(want)
  assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), np.linalg.norm(got - want) / np.linalg.norm(want)


def test_slot_prefill_copy_reset(slot_setup):
  """Slots of one cache: prefill into a slot, fork, release, reuse; reads bounded by max_context (2 of the
  4 pages of a slot), a pool of 5 pages shared by 3 slots."""
  model, seqs, logits, prefill, decode = slot_setup
  prefill = functools.partial(prefill, max_context=256)
  decode = functools.partial(decode, max_context=256)
  cache = model.init_cache(3, 512, kv_format="float32", page_tokens=128, num_pages=5)
  empty_rows = jax.tree.map(lambda a: np.asarray(a[:, 0]), cache.states)

  # A prompt into slot 0 only (rows of a batch go to the slots given), then a second one into slot 1.
  tok = np.zeros((1, 160), np.int32)
  tok[0, :150] = seqs[0, :150]
  out, cache = prefill(jnp.asarray(tok), cache, jnp.asarray([150]), jnp.asarray([0]))
  _close(out[0, :150], logits[0, :150])
  tok[0, :150] = seqs[3, :150]
  out, cache = prefill(jnp.asarray(tok), cache, jnp.asarray([100]), jnp.asarray([1]))
  _close(out[0, :100], logits[3, :100])
  np.testing.assert_array_equal(cache.lengths, [150, 100, 0])
  assert int(cache.num_free) == 2

  # Fork slot 0 into slot 2: new pages, same contents; the two continue independently.
  cache = copy_slot(cache, 0, 2)
  table = np.asarray(cache.page_table)
  assert set(table[2][table[2] >= 0]).isdisjoint(table[0][table[0] >= 0]) and int(cache.num_free) == 0
  assert not bool(cache.overflow)
  out, cache = decode(jnp.asarray([[seqs[0, 150]], [seqs[1, 150]]]), cache, None, jnp.asarray([0, 2]))
  _close(out[0, 0], logits[0, 150])
  _close(out[1, 0], logits[1, 150])

  # Release slot 0: its pages return, its state is empty; the fork (slot 2) is unaffected.
  cache = reset_slot(cache, 0)
  assert int(cache.num_free) == 2 and int(cache.lengths[0]) == 0 and np.all(np.asarray(cache.page_table[0]) < 0)
  for got, want in zip(jax.tree.leaves(jax.tree.map(lambda a: np.asarray(a[:, 0]), cache.states)),
                       jax.tree.leaves(empty_rows)):
    np.testing.assert_array_equal(got, want)
  out, cache = decode(jnp.asarray([[seqs[2, 151]], [0]]), cache, jnp.asarray([True, False]),
                      jnp.asarray([2, 0]))
  _close(out[0, 0], logits[2, 151])

  # Slot 0 reused for another prompt: pages another sequence wrote before are not seen.
  tok[0, :150] = seqs[3, :150]
  out, cache = prefill(jnp.asarray(tok), cache, jnp.asarray([140]), jnp.asarray([0]))
  _close(out[0, :140], logits[3, :140])
  np.testing.assert_array_equal(cache.lengths, [140, 100, 152])
  with pytest.raises(ValueError, match="same slot"):
    copy_slot(cache, 1, 1)


def test_running_out_of_pages_sets_overflow(slot_setup):
  model, seqs, _, prefill, _ = slot_setup
  cache = model.init_cache(3, 256, kv_format="float32", page_tokens=128, num_pages=5)
  tok = np.zeros((1, 160), np.int32)
  for slot in range(2):
    _, cache = prefill(jnp.asarray(tok), cache, jnp.asarray([150]), jnp.asarray([slot]))
  assert not bool(cache.overflow) and int(cache.num_free) == 1
  _, cache = prefill(jnp.asarray(tok), cache, jnp.asarray([150]), jnp.asarray([2]))
  assert bool(cache.overflow)
  cache = model.init_cache(3, 256, kv_format="float32", page_tokens=128)
  _, cache = prefill(jnp.asarray(tok), cache, jnp.asarray([150]), jnp.asarray([0]), max_context=128)
  assert bool(cache.overflow)  # past max_context
