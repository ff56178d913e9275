"""Quick Instruction on the speculative engine: SpeculativeBackend.fork / extend (dsv4_jax.serve.speculative).

The reference is the plain cached backend (CachedBackend: its fork and extend, and greedy decoding one token per
step), whose Quick Instruction answers tests/test_quick_instruction.py checks against fresh prefills. Checked: the
same answers on both backends (two waves of forks; through the engine with a request running meanwhile); the
parent's rows (main and MTP caches, pending MTP inputs, its full pages) bit-identical before and after the tasks,
and its continuation the plain one; a fork drafts as a fresh prefill of the same tokens would (MTP inputs and
cache equal, the same drafts accepted); the same errors as the plain backend.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dsv4_jax.serve import quick_instruction as qi
from dsv4_jax.serve.cached_backend import CachedBackend
from dsv4_jax.serve.engine import Engine
from dsv4_jax.serve.params import SamplingParams
from dsv4_jax.serve.speculative import SpeculativeBackend
from serve_fixtures import greedy_decode, ids, messages, model, tok  # noqa: F401 (fixtures)

N = 4  # answer tokens
SLOTS, MAX_LEN = 4, 512  # parent + 3 forks: 4 tasks take two waves


@pytest.fixture(scope="module")
def plain(model):
  return CachedBackend(model, SLOTS, MAX_LEN, kv_format="float32")


@pytest.fixture(scope="module")
def spec(model):
  return SpeculativeBackend(model, SLOTS, MAX_LEN, kv_format="float32")


def _slot_rows(cache, slot):
  """Everything of one slot: length, page-table row, state rows, and the entries of its pages."""
  pages = np.asarray(cache.page_table)[slot]
  pages = pages[pages >= 0]
  rows = [np.asarray(cache.lengths)[slot], np.asarray(cache.page_table)[slot]]
  rows += [np.asarray(a)[:, slot] for a in jax.tree.leaves(cache.states)]
  rows += [np.asarray(p)[:, pages] for p in jax.tree.leaves(cache.pools)]
  return rows


def _parent_rows(spec, slot=0):
  d = spec.draft
  return (_slot_rows(spec.cache, slot) + _slot_rows(d.cache, slot)
          + [np.asarray(d.h)[slot], np.asarray(d.tokens)[slot], np.asarray(d.count)[slot]])


def test_quick_instructions_equal_plain_and_leave_the_parent_unchanged(plain, spec, tok, ids):
  prefix_ids, suffix_ids, gen_ids = ids
  runs, parents = {}, {}
  for name, backend in (("plain", plain), ("spec", spec)):
    backend.prefill(0, prefix_ids)
    before = _parent_rows(spec) if name == "spec" else None
    runs[name] = qi.quick_instruction_ids(backend, prefix_ids, suffix_ids, slots=[1, 2, 3], eos_id=tok.eos_id,
                                          max_tokens=N, parent=0)
    if before is not None:
      for a, b in zip(before, _parent_rows(spec), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(n is None for n in backend._lengths[1:])
    for t in gen_ids:  # the parent's continuation (token by token: no extra compile)
      logits = backend.decode([0], [t])
    parents[name] = greedy_decode(backend, 0, logits, N, tok.eos_id)
    backend.release(0)
  assert runs["spec"].token_ids == runs["plain"].token_ids
  assert any(runs["plain"].token_ids.values())
  assert parents["spec"] == parents["plain"]
  for cache in (spec.cache, spec.draft.cache):  # every page back: the forks' shared pages counted right
    assert int(cache.num_free) == cache.num_pages


def _sequence_entries(cache, slot):
  """Each pool's entries of one slot in sequence order (through its page table)."""
  pages = np.maximum(np.asarray(cache.page_table)[slot], 0)
  return [np.asarray(p)[:, pages].reshape(p.shape[0], -1, p.shape[-1]) for p in jax.tree.leaves(cache.pools)]


def _assert_same_draft(spec, a, b):
  """Slots a and b hold the same MTP side: pending inputs, MTP cache length, state rows and finished entries."""
  d = spec.draft
  n = int(d.count[a])
  assert spec._lengths[a] == spec._lengths[b] and n == int(d.count[b]) and n in (1, 2)
  np.testing.assert_allclose(np.asarray(d.h[a, :n]), np.asarray(d.h[b, :n]), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(d.tokens[a, :n - 1]), np.asarray(d.tokens[b, :n - 1]))
  length = int(d.cache.lengths[a])
  assert length == int(d.cache.lengths[b]) == spec._lengths[a] - n
  for x in jax.tree.leaves(d.cache.states):
    np.testing.assert_allclose(np.asarray(x)[:, a], np.asarray(x)[:, b], rtol=1e-4, atol=1e-5)
  for x, y in zip(_sequence_entries(d.cache, a), _sequence_entries(d.cache, b)):  # finished entries: length // m
    k = length * x.shape[1] // (np.asarray(d.cache.page_table).shape[1] * d.cache.page_tokens)
    np.testing.assert_allclose(x[:, :k], y[:, :k], rtol=1e-4, atol=1e-5)


def test_a_fork_drafts_as_a_fresh_prefill(spec, tok, ids):
  """Slot 1 = fork of the prefix + the task suffix; slot 2 = a prefill of the same tokens. Their MTP inputs and
  caches agree and speculative greedy steps emit the same tokens with the same drafts accepted."""
  prefix_ids, suffix_ids, _ = ids
  suffix = suffix_ids["action"]
  spec.prefill(0, prefix_ids)
  spec.fork(0, 1)
  forked = np.asarray(spec.extend([1], [suffix]))[0]
  fresh = np.asarray(spec.prefill(2, prefix_ids + suffix))
  np.testing.assert_allclose(forked, fresh, rtol=1e-4, atol=1e-4 * np.abs(fresh).max())
  _assert_same_draft(spec, 1, 2)
  last = [int(np.argmax(forked)), int(np.argmax(fresh))]
  assert last[0] == last[1]
  gen, kept_all = [[last[0]], [last[1]]], []
  for _ in range(4):  # the draft of each step is a function of the draft state and the last token
    toks, kept = spec.speculate([1, 2], [g[-1] for g in gen], [SamplingParams(temperature=0.0, seed=0)] * 2,
                                [len(g) for g in gen], [100, 100])
    for g, t, k in zip(gen, toks, kept):
      g += [int(x) for x in t[:k]]
    kept_all.append(list(kept))
    _assert_same_draft(spec, 1, 2)
  assert gen[0] == gen[1] and all(a == b for a, b in kept_all)
  for slot in (0, 1, 2):
    spec.release(slot)


def test_engine_quick_instructions_with_a_request_running(plain, spec, tok, messages, ids):
  prefix_ids, _, gen_ids = ids
  out = []
  for backend in (plain, spec):
    engine = Engine(backend, tok)
    h = engine.submit(prefix_ids + gen_ids, SamplingParams(temperature=0.0, max_tokens=N))
    answers = engine.quick_instructions(messages, ["title", "query"], max_tokens=N)
    engine.run_until_idle()
    out.append((answers, h.result().token_ids))
  assert out[1] == out[0]
  assert all(n is None for n in spec._lengths)


def test_errors_as_the_plain_backend(model, plain, spec, tok, messages, ids):
  prefix_ids = ids[0]
  for backend in (plain, spec):
    backend.prefill(0, prefix_ids)  # the prompt shape compiled already
    backend.prefill(1, prefix_ids[:-1])
    for src, dst in ((0, 1), (2, 3), (0, 0)):  # busy target, empty source, itself
      with pytest.raises(RuntimeError, match="fork: slot"):
        backend.fork(src, dst)
    with pytest.raises(RuntimeError, match="holds no sequence"):
      backend.extend([2], [[1]])
    with pytest.raises(ValueError, match="cannot add"):
      backend.extend([0], [[1] * MAX_LEN])
    with pytest.raises(ValueError, match="need at least one free slot"):
      qi.quick_instruction_ids(backend, prefix_ids, {"title": [1]}, slots=[0], eos_id=tok.eos_id, parent=0)
    backend.release(0)
    backend.release(1)
  one_slot = Engine(SpeculativeBackend(model, 1, 64, kv_format="float32"), tok)
  with pytest.raises(NotImplementedError, match=">= 2 slots"):
    one_slot.quick_instructions(messages, ["title"])
