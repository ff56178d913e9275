"""The engine's dispatch-ahead mode (dsv4_jax.serve.engine): a step is dispatched before the previous step's
tokens are read, tokens drawn on the device (CachedBackend.decode_sample / prefill_sample). It must produce what
the waiting engine produces, request by request (stops, cancellation, slot reuse included), and really overlap."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.serve.backend import FullForwardBackend
from dsv4_jax.serve.cached_backend import CachedBackend, DrawnTokens
from dsv4_jax.serve.engine import Engine, EngineError
from dsv4_jax.serve.params import SamplingParams as SP
from dsv4_jax.serve.sampling import SamplingRows, pick_tokens, sample_rows
from serve_fixtures import model, tok  # noqa: F401 (fixtures)

PROMPTS = ["hello world", "the quick brown fox jumps over", "c", "你好 世界", "Stop", "def f(x): return x"]


@pytest.fixture(scope="module")
def backend(model):
  return CachedBackend(model, 3, 64, kv_format="float32")


def serve(backend, tok, requests, ahead, cancel_after=None):
  """Completions of `requests` [(prompt text, SamplingParams)] through one engine; `cancel_after`: (request
  index, steps) cancels that request after so many engine steps."""
  engine = Engine(backend, tok, dispatch_ahead=ahead)
  assert engine.dispatch_ahead == ahead
  hs = [engine.submit([tok.bos_id] + tok.encode(p), s) for p, s in requests]
  steps = 0
  while engine.has_work:
    engine.step()
    steps += 1
    if cancel_after is not None and steps == cancel_after[1]:
      hs[cancel_after[0]].cancel()
  return [h.result() for h in hs]


def summary(completions):
  return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in completions]


def test_same_completions_as_the_waiting_engine(backend, tok):
  """Six requests over three slots (slots reused), greedy and sampled; then stop strings and stop tokens taken
  from the middle of the free-running outputs, so requests end early (with a token in flight) mid-batch."""
  free = [SP(max_tokens=10, seed=1, ignore_eos=True), SP(max_tokens=7, temperature=1.0, seed=2, ignore_eos=True),
          SP(max_tokens=1, seed=3), SP(max_tokens=9, temperature=0.8, top_k=20, seed=4, ignore_eos=True),
          SP(max_tokens=12, temperature=1.2, top_p=0.9, seed=5, ignore_eos=True), SP(max_tokens=6, seed=6)]
  requests = list(zip(PROMPTS, free))
  waited = serve(backend, tok, requests, ahead=False)
  assert summary(serve(backend, tok, requests, ahead=True)) == summary(waited)
  assert [c.completion_tokens for c in waited[:5]] == [10, 7, 1, 9, 12]

  stopping = list(requests)
  stopping[0] = (PROMPTS[0], SP(max_tokens=10, seed=1, ignore_eos=True, stop_token_ids=(waited[0].token_ids[4],)))
  text = waited[4].text
  stopping[4] = (PROMPTS[4], SP(max_tokens=12, temperature=1.2, top_p=0.9, seed=5, ignore_eos=True,
                                stop=(text[len(text) // 2:len(text) // 2 + 2],)))
  waited = serve(backend, tok, stopping, ahead=False)
  assert waited[0].finish_reason == "stop" and waited[0].completion_tokens <= 5
  assert waited[4].finish_reason == "stop" and len(waited[4].text) < len(text)
  assert summary(serve(backend, tok, stopping, ahead=True)) == summary(waited)


def test_cancel_mid_flight_leaves_the_others_unchanged(backend, tok):
  requests = [(p, SP(max_tokens=8, seed=i, temperature=0.9, ignore_eos=True)) for i, p in enumerate(PROMPTS[:4])]
  alone = serve(backend, tok, requests, ahead=False)
  got = serve(backend, tok, requests, ahead=True, cancel_after=(1, 3))
  assert got[1].finish_reason == "cancelled" and got[1].completion_tokens < 8
  assert got[1].token_ids == alone[1].token_ids[:got[1].completion_tokens]
  assert summary([got[0]] + got[2:]) == summary([alone[0]] + alone[2:])


class Recorder:
  """Wraps a CachedBackend: logs each dispatch and each read of its drawn tokens, in order."""

  def __init__(self, inner, overflow_at=None):
    self.inner, self.num_slots, self.max_len, self.vocab_size = inner, inner.num_slots, inner.max_len, \
        inner.vocab_size
    self.events, self.overflow_at, self._n = [], overflow_at, 0

  def _wrap(self, drawn):
    n, self._n = self._n, self._n + 1
    self.events.append(("dispatch", n))
    overflow = jnp.asarray(True) if n == self.overflow_at else drawn.overflow
    recorder = self

    class Logged(DrawnTokens):
      def read(self):
        recorder.events.append(("read", n))
        return super().read()

    return Logged(drawn.tokens_B, overflow)

  def decode_sample(self, slots, rows):
    return self._wrap(self.inner.decode_sample(slots, rows))

  def prefill_sample(self, slot, ids, rows):
    return self._wrap(self.inner.prefill_sample(slot, ids, rows))

  def release(self, slot):
    self.inner.release(slot)


def test_each_step_is_dispatched_before_the_previous_one_is_read(backend, tok):
  rec = Recorder(backend)
  engine = Engine(rec, tok)
  assert engine.dispatch_ahead
  h = engine.submit([tok.bos_id] + tok.encode("hello"), SP(max_tokens=6, seed=0, ignore_eos=True))
  engine.run_until_idle()
  assert h.result().completion_tokens == 6
  order = {e: i for i, e in enumerate(rec.events)}
  assert [e for e in rec.events if e[0] == "dispatch"] == [("dispatch", n) for n in range(6)]  # prefill + 5
  for n in range(5):
    assert order[("dispatch", n + 1)] < order[("read", n)], rec.events
  assert ("read", 5) in order


def test_overflow_fails_the_step_s_requests_with_a_clear_error(backend, tok):
  rec = Recorder(backend, overflow_at=3)
  engine = Engine(rec, tok)
  hs = [engine.submit([tok.bos_id] + tok.encode(p), SP(max_tokens=6, seed=0, ignore_eos=True)) for p in PROMPTS[:2]]
  engine.run_until_idle()
  for h in hs:
    with pytest.raises(EngineError, match="overflowed"):
      h.result()
  assert engine.num_slots == 3 and not engine.has_work
  h = engine.submit([tok.bos_id] + tok.encode("again"), SP(max_tokens=3, seed=0, ignore_eos=True))
  engine.run_until_idle()  # the engine keeps serving (the injected flag was one step's only)
  assert h.result().completion_tokens == 3


def test_dispatch_ahead_needs_a_backend_that_draws_on_the_device(model, tok):
  with pytest.raises(ValueError, match="decode_sample"):
    Engine(FullForwardBackend(model, 2, 64), tok, dispatch_ahead=True)
  assert not Engine(FullForwardBackend(model, 2, 64), tok).dispatch_ahead


def test_sampling_rows_and_the_greedy_only_path():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)) * 3, jnp.float32)
  rows = SamplingRows.build(4, {1: (SP(temperature=0.7, top_k=5, seed=9), 3), 3: (SP(top_p=0.5, seed=2), 0)})
  assert rows.seeds.tolist() == [0, 9, 0, 2] and rows.positions.tolist() == [0, 3, 0, 0]
  assert not rows.greedy_only and SamplingRows.build(4, {3: (SP(seed=1), 2)}).greedy_only
  want = np.asarray(sample_rows(logits, *rows.arrays))
  assert np.asarray(pick_tokens(logits, *rows.arrays)).tolist() == want.tolist()
  assert want[[0, 2, 3]].tolist() == np.asarray(jnp.argmax(logits, -1))[[0, 2, 3]].tolist()
  greedy = SamplingRows.build(4, {})
  assert np.asarray(pick_tokens(logits, *greedy.arrays, greedy_only=True)).tolist() == \
      np.asarray(sample_rows(logits, *greedy.arrays)).tolist()


def test_backend_checks_its_sampling_rows(backend):
  with pytest.raises(ValueError, match="need 3"):
    backend.decode_sample([0], SamplingRows.build(2, {}))
  with pytest.raises(RuntimeError, match="holds no sequence"):
    backend.decode_sample([2], SamplingRows.build(3, {}))


def test_a_failing_prefill_fails_only_its_request(backend, tok):
  class FailOn(Recorder):
    def prefill_sample(self, slot, ids, rows):
      if list(ids)[1:] == tok.encode(PROMPTS[1]):
        raise RuntimeError("injected prefill failure")
      return super().prefill_sample(slot, ids, rows)

  requests = [(p, SP(max_tokens=5, seed=i, ignore_eos=True)) for i, p in enumerate(PROMPTS[:3])]
  alone = serve(backend, tok, requests, ahead=False)
  engine = Engine(FailOn(backend), tok)
  hs = [engine.submit([tok.bos_id] + tok.encode(p), s) for p, s in requests]
  engine.run_until_idle()
  with pytest.raises(EngineError, match="injected prefill failure"):
    hs[1].result()
  assert summary([hs[0].result(), hs[2].result()]) == summary([alone[0], alone[2]])


def test_sampler_with_ties_at_the_k_th_value_matches_the_one_row_sampler():
  """Top-k keeps every value tied with the k-th, and top-p then works on that set (one sort per row)."""
  import jax
  from dsv4_jax.serve.sampling import sample
  logits = jnp.asarray([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 2.0, -1.0]] * 2 + [[1.0] * 8], jnp.float32)
  for t, k, p in [(1.0, 2, 1.0), (0.7, 3, 0.6), (1.3, 2, 0.9), (1.0, 1, 0.5)]:
    for pos, seed in [(0, 1), (5, 9), (2, 2**31)]:
      key = jax.random.fold_in(jax.random.key(seed), pos)
      want = [int(sample(logits[i:i + 1], key, temperature=t, top_k=k, top_p=p)[0]) for i in range(3)]
      got = pick_tokens(logits, np.full(3, seed, np.uint32), [pos] * 3, [t] * 3, [k] * 3, [p] * 3)
      assert np.asarray(got).tolist() == want, (t, k, p, pos, seed)
