"""Quick Instruction (dsv4_jax.serve.quick_instruction) and the copy-on-write slot fork under it
(dsv4_jax.serve.cache.fork_slot), on a random tiny model; plus the serving backends' exact MoE.

References are independent of the fork: the model's full forward (no cache) for logits, and greedy decoding of
the whole prompt (conversation + task suffix) by a fresh prefill or by the full-forward backend for tokens.
"""

from __future__ import annotations

import http.client
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.model import moe
from dsv4_jax.model.cache import page_refcounts
from dsv4_jax.serve import quick_instruction as qi
from dsv4_jax.serve.backend import FullForwardBackend, make_backend
from dsv4_jax.serve.cache import fork_slot, reset_slot
from dsv4_jax.serve.cached_backend import CachedBackend
from dsv4_jax.serve.chat import ASSISTANT, EOS, THINK_END, THINK_START, encode_messages
from dsv4_jax.serve.engine import Engine
from dsv4_jax.serve.params import InvalidRequest, SamplingParams
from dsv4_jax.serve.server import Server
from dsv4_jax.serve.steps import make_prefill
from dsv4_jax.serve.tokens import TASK_ACTION, TASK_TITLE
from serve_fixtures import TASKS, greedy_decode, ids, messages, model, tok  # noqa: F401 (fixtures)


# ----- the fork at the cache level ---------------------------------------------------------------------------
def _close(got, want, tol=1e-4):
  got, want = np.asarray(got), np.asarray(want)
  assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.fixture(scope="module")
def fork_setup(tiny_model):
  """Three sequences that share their first 300 tokens, their full-forward logits, and the jitted steps (every
  cached call below has one of two shapes: [1, 320] or [3, 8] with per-row counts, so few compiles)."""
  model = tiny_model
  L = 300
  seqs = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (3, L + 16)).astype(np.int32)
  seqs[1:, :L] = seqs[0, :L]
  want = np.asarray(jax.jit(lambda t: model(t, with_mtp=False).logits)(jnp.asarray(seqs)))
  prefill = make_prefill(model)

  def first(cache, slot, n):  # seqs[slot][:n] into an empty slot
    tok = np.zeros((1, 320), np.int32)
    tok[0, :n] = seqs[slot, :n]
    return prefill(jnp.asarray(tok), cache, jnp.asarray([n]), jnp.asarray([slot]))

  def step(cache, counts, lengths):  # rows 0..2 -> slots 0..2, row b adds seqs[b][lengths[b]:][:counts[b]]
    tok = np.zeros((3, 8), np.int32)
    for b, (c, n) in enumerate(zip(counts, lengths)):
      tok[b, :c] = seqs[b, n:n + c]
    return prefill(jnp.asarray(tok), cache, jnp.asarray(counts), jnp.asarray([0, 1, 2]))

  new_cache = lambda: model.init_cache(4, 512, kv_format="float32", page_tokens=128, num_pages=9)
  return L, seqs, want, first, step, new_cache


def test_fork_shares_full_pages_copies_the_last_and_refcounts_free_on_last_release(fork_setup):
  """Slot 0 holds 300 tokens (pages: 2 full + 1 partial of 128); slots 1, 2 fork it and the three sequences
  continue differently, interleaved, past CSA block ends inside the partial page: every step's logits equal the
  full forward of that slot's own sequence (a shared partial page would mix their entries)."""
  L, _, want, first, step, new_cache = fork_setup
  cache = new_cache()
  out, cache = first(cache, 0, L)
  _close(out[0, L - 1], want[0, L - 1])
  assert int(cache.num_free) == 6
  cache = fork_slot(cache, 0, 1)
  cache = fork_slot(cache, 0, 2)
  table = np.asarray(cache.page_table)
  np.testing.assert_array_equal(table[1, :2], table[0, :2])  # full pages shared
  np.testing.assert_array_equal(table[2, :2], table[0, :2])
  assert len({table[0, 2], table[1, 2], table[2, 2]}) == 3 and min(table[:3, 2]) >= 0  # partial page copied
  refs = np.asarray(page_refcounts(cache))
  assert list(refs[table[0, :3]]) == [3, 3, 1] and refs.sum() == 9 and int(cache.num_free) == 4
  np.testing.assert_array_equal(cache.lengths, [L, L, L, 0])
  assert not bool(cache.overflow)

  # Children 1, 2 add 8 tokens (two CSA entries into their partial pages), then the parent adds its 8.
  out, cache = step(cache, [0, 8, 8], [L, L, L])
  _close(out[1:, 7], want[1:, L + 7])
  out, cache = step(cache, [8, 0, 0], [L, L + 8, L + 8])
  _close(out[0], want[0, L:L + 8])
  for t in range(L + 8, L + 11):  # then all three step together
    out, cache = step(cache, [1, 1, 1], [t, t, t])
    _close(out[:, 0], want[:, t])

  # Release: a shared page is freed only by its last holder; all pages come back, the free stack a permutation.
  cache = reset_slot(cache, 0)
  assert int(cache.num_free) == 5 and list(np.asarray(page_refcounts(cache))[table[0, :2]]) == [2, 2]
  out, cache = step(cache, [0, 1, 1], [0, L + 11, L + 11])  # the children's shared pages are intact
  _close(out[1:, 0], want[1:, L + 11])
  cache = reset_slot(cache, 1)
  assert int(cache.num_free) == 6
  cache = reset_slot(cache, 2)
  assert int(cache.num_free) == 9 and sorted(np.asarray(cache.free_pages).tolist()) == list(range(9))
  assert not np.asarray(page_refcounts(cache)).any()
  with pytest.raises(ValueError, match="same slot"):
    fork_slot(cache, 1, 1)


def test_fork_at_a_page_boundary_takes_no_page(fork_setup):
  _, _, want, first, step, new_cache = fork_setup
  cache = new_cache()
  _, cache = first(cache, 1, 256)
  cache = fork_slot(cache, 1, 2)
  assert int(cache.num_free) == 7 and np.asarray(cache.page_table)[2, 2] == -1
  out, cache = step(cache, [0, 0, 8], [0, 0, 256])  # the child's next tokens open a page of its own
  _close(out[2], want[2, 256:264])
  assert int(cache.num_free) == 6 and not bool(cache.overflow)


# ----- prompts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_task_prompts_follow_the_encoder(messages, mode):
  prefix, suffixes, thinking_mode = qi.task_prompts(messages, qi.TASKS, mode)
  think = THINK_START if thinking_mode == "thinking" else THINK_END
  assert suffixes["action"] == ASSISTANT + think + TASK_ACTION and suffixes["title"] == TASK_TITLE
  assert prefix.endswith("Name this chat.")
  for task in qi.TASKS:  # independently: the encoder's prompt for the task-marked conversation
    marked = [dict(m) for m in messages]
    marked[-1]["task"] = task
    assert encode_messages(marked, thinking_mode) == prefix + suffixes[task]
  # A title after the first answer: the task token follows the assistant's EOS.
  done = messages + [{"role": "assistant", "content": "Sure."}]
  prefix, suffixes, _ = qi.task_prompts(done, ["title"], mode)
  assert prefix.endswith("Sure." + EOS) and suffixes == {"title": TASK_TITLE}
  with pytest.raises(InvalidRequest, match="unknown task"):
    qi.task_prompts(messages, ["summary"], mode)


# ----- on the engine's backends ----------------------------------------------------------------------------
def _greedy(backend, tok, prompts, max_tokens):
  """Reference: greedy tokens of each whole prompt (conversation + suffix) prefilled from scratch, EOS dropped."""
  engine = Engine(backend, tok)
  hs = [engine.submit(p, SamplingParams(temperature=0.0, max_tokens=max_tokens)) for p in prompts]
  engine.run_until_idle()
  return [[t for t in h.result().token_ids if t != tok.eos_id] for h in hs]


def _post(server, body):
  conn = http.client.HTTPConnection(server.host, server.port, timeout=300)
  try:
    conn.request("POST", "/v1/quick_instructions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())
  finally:
    conn.close()


def test_quick_instructions_equal_a_fresh_prefill_and_leave_the_parent_unchanged(model, tok, messages, ids):
  N = 4
  prefix_ids, suffix_ids, gen_ids = ids  # gen_ids: the parent's own continuation, the normal chat prompt
  backend = CachedBackend(model, 4, 512, kv_format="float32")  # parent + 3 forks: 4 tasks take two waves
  *want_tasks, want_parent = _greedy(backend, tok, [prefix_ids + suffix_ids[t] for t in TASKS] + [prefix_ids + gen_ids],
                                     N)

  backend.prefill(0, prefix_ids)
  run = qi.quick_instruction_ids(backend, prefix_ids, suffix_ids, slots=[1, 2, 3], eos_id=tok.eos_id,
                                 max_tokens=N, parent=0)
  assert [run.token_ids[t] for t in TASKS] == want_tasks
  assert run.first_token_s > 0 and run.prefix_s == 0
  held = np.asarray(backend.cache.page_table)[0]
  assert int(backend.cache.num_free) == backend.cache.num_pages - int((held >= 0).sum())  # forks' pages back
  # The parent continues as if no task had forked it.
  assert greedy_decode(backend, 0, backend.extend([0], [gen_ids]), N, tok.eos_id) == want_parent
  backend.release(0)
  assert int(backend.cache.num_free) == backend.cache.num_pages and not np.asarray(page_refcounts(backend.cache)).any()

  # Through the engine, with a request running in the background thread at the same time; and over HTTP.
  engine = Engine(backend, tok)
  server = Server(engine, tok, "tiny", port=0).start()
  try:
    h = engine.submit(prefix_ids + gen_ids, SamplingParams(temperature=0.0, max_tokens=N))
    answers = engine.quick_instructions(messages, TASKS, max_tokens=N)
    assert answers == {t: tok.decode(task_ids) for t, task_ids in zip(TASKS, want_tasks)}
    assert [t for t in h.result(timeout=300).token_ids if t != tok.eos_id] == want_parent
    status, body = _post(server, {"model": "tiny", "messages": messages, "tasks": ["title", "query"], "max_tokens": N})
    assert status == 200 and body["answers"] == {t: answers[t] for t in ["title", "query"]}
    status, body = _post(server, {"model": "tiny", "messages": messages, "tasks": ["summary"]})
    assert status == 400 and "unknown task" in body["error"]["message"]
  finally:
    server.shutdown()
  assert int(backend.cache.num_free) == backend.cache.num_pages
  with pytest.raises(InvalidRequest, match="exceeds the context"):
    Engine(backend, tok).quick_instructions(messages, ["title"], max_tokens=400)

  # The cache-less backend forks too (no cache at all: an independent check of the answers' first tokens).
  answers = Engine(FullForwardBackend(model, 3, 512), tok).quick_instructions(messages, ["title", "action"],
                                                                               max_tokens=2)
  assert answers == {t: tok.decode(want_tasks[TASKS.index(t)][:2]) for t in ["title", "action"]}


# ----- exact MoE for serving ---------------------------------------------------------------------------------
def test_serving_forces_the_exact_moe(model, tok, monkeypatch):
  """moe_impl "auto" picks the token-dropping capacity path on GPU: here "auto" is made to pick it everywhere
  (and the capacity path to fail unless its capacity is the step's token count, which drops nothing), and every
  serving path still runs, on moe_impl "exact": the capacity einsums with C = T for decode, ragged for a
  prompt longer than moe.EXACT_CAPACITY_MAX_TOKENS."""
  assert model.cfg.moe_impl == "auto"
  monkeypatch.setattr(moe, "moe_impl", lambda cfg: "capacity" if cfg.moe_impl == "auto" else cfg.moe_impl)
  capacity_matmuls, ran = moe.RoutedExperts.capacity_matmuls, []

  def exact_capacity_only(self, x_TD, weights_TK, experts_TK, capacity=None):
    if capacity != x_TD.shape[0]:
      raise AssertionError(f"serving ran the capacity MoE path with capacity {capacity} for {x_TD.shape[0]} tokens")
    ran.append(capacity)
    return capacity_matmuls(self, x_TD, weights_TK, experts_TK, capacity)

  monkeypatch.setattr(moe.RoutedExperts, "capacity_matmuls", exact_capacity_only)
  long = moe.EXACT_CAPACITY_MAX_TOKENS + 8
  engine = Engine(make_backend(model, 1, long + 8, "cached"), tok)
  assert engine.backend.cfg.moe_impl == "exact"
  h = engine.submit([tok.bos_id] + tok.encode("hello"), SamplingParams(temperature=0.0, max_tokens=2))
  h2 = engine.submit([tok.bos_id] * long, SamplingParams(temperature=0.0, max_tokens=2))
  engine.run_until_idle()
  assert len(h.result().token_ids) >= 1 and len(h2.result().token_ids) >= 1
  assert ran and all(moe.exact_uses_capacity(c) for c in ran)  # short steps took the capacity einsums
  assert make_backend(model, 1, 64, "full").cfg.moe_impl == "exact"
  assert model.cfg.moe_impl == "auto"  # the caller's model is not changed
  assert moe.moe_impl(model.cfg) == "capacity"  # the patch does bite an unserved model
