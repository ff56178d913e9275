"""The serving engine (dsv4_jax.serve.engine): continuous batching over slots, per-request sampling and isolation,
stop strings/tokens, max_tokens, streaming, cancellation, chat encoding and completion parsing.

A random tiny model (vocabulary = the test tokenizer's; both from tests/serve_fixtures.py) runs the full-forward
backend; scripted backends (logits that spell out a fixed completion) test the text handling exactly.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.model.transformer import DeepSeekV4
from dsv4_jax.serve.backend import FullForwardBackend, make_backend
from dsv4_jax.serve.cached_backend import CachedBackend, release_op
from dsv4_jax.serve.chat import (
  ASSISTANT, EOS, REASONING_EFFORT_MAX_PREFIX, THINK_END, THINK_START, encode_messages, resolve_mode)
from dsv4_jax.serve.conversation import ChatStreamSplitter, parse_completion
from dsv4_jax.serve.detok import TextStream
from dsv4_jax.serve.dsml import encode_tool_calls
from dsv4_jax.serve.engine import Engine, EngineError
from dsv4_jax.serve.params import InvalidRequest, SamplingParams as SP
from dsv4_jax.serve.sampling import sample, sample_rows
from scripted_backend import Script
from serve_fixtures import model, tok  # noqa: F401 (fixtures)


class Spy:
  """Wraps a backend; records prefills and how many slots each decode step carried."""

  def __init__(self, inner):
    self.inner, self.num_slots, self.max_len = inner, inner.num_slots, inner.max_len
    self.vocab_size = inner.vocab_size
    self.prefills, self.decode_sizes, self.fail_on = [], [], None

  def prefill(self, slot, ids):
    if self.fail_on is not None and list(ids) == self.fail_on:
      raise RuntimeError("injected prefill failure")
    self.prefills.append((slot, list(ids)))
    return self.inner.prefill(slot, ids)

  def decode(self, slots, tokens):
    self.decode_sizes.append(len(slots))
    return self.inner.decode(slots, tokens)

  def release(self, slot):
    self.inner.release(slot)


@pytest.fixture(scope="module")
def full(model):
  return FullForwardBackend(model, num_slots=3, max_len=64)


@pytest.fixture
def engine(full, tok):
  spy = Spy(full)
  return Engine(spy, tok)


def scripted(tok, text_or_ids, **kw):
  ids = tok.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
  return Engine(Script(tok.vocab_size, lambda prompt: ids, tok.eos_id, **kw), tok)


def run(engine, prompt_ids, params):
  h = engine.submit(prompt_ids, params)
  engine.run_until_idle()
  return h.result()


# ----- sampling ---------------------------------------------------------------------------------------------------
def test_sample_rows_matches_sample_row_by_row():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 40)) * 3, jnp.float32)
  for t, k, p in [(0, 0, 1), (1.0, 0, 1), (0.7, 5, 1), (1.3, 0, 0.5), (0.9, 7, 0.8)]:
    for pos, seed in [(0, 0), (3, 7), (11, 2**32 - 1)]:
      key = jax.random.fold_in(jax.random.key(seed), pos)
      want = [int(sample(logits[i:i + 1], key, temperature=t, top_k=k, top_p=p)[0]) for i in range(3)]
      got = sample_rows(logits, np.full(3, seed, np.uint32), [pos] * 3, [t] * 3, [k] * 3, [p] * 3)
      assert np.asarray(got).tolist() == want, (t, k, p, pos, seed)
  # top-k 1 is greedy; a row's draw does not depend on its neighbours' parameters
  assert np.asarray(sample_rows(logits, [1, 2, 3], [0] * 3, [1.0] * 3, [1] * 3, [1.0] * 3)).tolist() == \
      np.asarray(jnp.argmax(logits, -1)).tolist()
  a = sample_rows(logits, [5, 6, 7], [1, 2, 3], [1.0, 0.5, 0.0], [0, 3, 0], [1.0, 0.9, 1.0])
  b = sample_rows(logits, [5, 9, 1], [1, 0, 0], [1.0, 2.0, 1.0], [0, 0, 2], [1.0, 1.0, 0.3])
  assert int(a[0]) == int(b[0])


def test_params_validation():
  for bad in [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_tokens=0),
              dict(seed="1"), dict(stop=("",)), dict(temperature=float("nan")), dict(temperature=True)]:
    with pytest.raises(InvalidRequest):
      SP(**bad)
  assert SP(seed=None).with_seed().seed is not None and SP(seed=4).with_seed().seed == 4


# ----- batching ---------------------------------------------------------------------------------------------------
REQUESTS = [  # different lengths and sampling; more requests than the 3 slots
  ("hello world", SP(max_tokens=12, seed=1, ignore_eos=True)),
  ("the quick brown fox jumps over the lazy dog. def f(x): return", SP(max_tokens=7, temperature=1.0, seed=2)),
  ("c", SP(max_tokens=15, temperature=0.8, top_k=20, seed=3, ignore_eos=True)),
  ("你好 世界", SP(max_tokens=5, temperature=1.0, top_p=0.9, seed=4)),
  ("Stop", SP(max_tokens=9, temperature=1.2, top_k=50, top_p=0.95, seed=5, ignore_eos=True)),
]


def test_batching_isolation_and_queueing(engine, tok):
  prompts = [[tok.bos_id] + tok.encode(p) for p, _ in REQUESTS]
  handles = [engine.submit(p, params) for p, (_, params) in zip(prompts, REQUESTS)]
  engine.run_until_idle()
  batched = [h.result() for h in handles]
  spy = engine.backend
  assert max(spy.decode_sizes) == 3  # three slots decoded together...
  assert len(spy.prefills) == 5 and sorted({s for s, _ in spy.prefills}) == [0, 1, 2]  # ...and slots reused
  for p, (_, params), b in zip(prompts, REQUESTS, batched):
    alone = run(engine, p, params)
    assert alone.token_ids == b.token_ids and alone.text == b.text
    assert b.completion_tokens == len(b.token_ids) and b.prompt_tokens == len(p)
    if params.ignore_eos:
      assert b.finish_reason == "length" and b.completion_tokens == params.max_tokens
  assert len({tuple(b.token_ids) for b in batched}) == 5


def test_seed_reproducible_and_different_seeds_differ(engine, tok):
  prompt = [tok.bos_id] + tok.encode("hello")
  a, b, c = (run(engine, prompt, SP(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)) for s in (7, 7, 8))
  assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
  greedy = run(engine, prompt, SP(max_tokens=12, ignore_eos=True))
  assert greedy.token_ids == run(engine, prompt, SP(max_tokens=12, seed=123, ignore_eos=True)).token_ids


def test_max_tokens_and_context_limit(engine, tok):
  prompt = [tok.bos_id] + tok.encode("the quick brown fox")
  c = run(engine, prompt, SP(max_tokens=3, ignore_eos=True))
  assert (c.finish_reason, c.completion_tokens, c.stop_reason) == ("length", 3, None)
  c = run(engine, prompt, SP(max_tokens=None, ignore_eos=True))  # until the slot's 64 tokens are used
  assert c.finish_reason == "length" and len(prompt) + c.completion_tokens == 64


def test_streaming_deltas_concatenate_to_the_text(engine, tok):
  seen = []
  h = engine.submit([tok.bos_id] + tok.encode("café"), SP(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True),
                    on_delta=seen.append)
  engine.run_until_idle()
  streamed = list(h.stream())
  c = h.result()
  assert streamed == seen and "".join(streamed) == c.text == tok.decode(c.token_ids)
  assert all(streamed) and not any(d.endswith("\ufffd") for d in streamed[:-1])  # whole characters


def test_invalid_requests_are_refused_before_queueing(engine, tok):
  with pytest.raises(InvalidRequest, match="empty"):
    engine.submit([], SP())
  with pytest.raises(InvalidRequest, match="context") as e:
    engine.submit([1] * 64, SP())
  assert e.value.param == "prompt"
  with pytest.raises(InvalidRequest, match="max_tokens") as e:
    engine.submit([1] * 60, SP(max_tokens=5))
  assert e.value.param == "max_tokens"
  with pytest.raises(InvalidRequest, match="token ids"):
    engine.submit([tok.vocab_size], SP())
  assert not engine.has_work


def test_cancel_and_failure_leave_others_untouched(engine, tok):
  prompts = [[tok.bos_id] + tok.encode(t) for t in ("hello world", "def f", "café")]
  params = SP(max_tokens=10, seed=1, ignore_eos=True)
  want = [run(engine, p, params).token_ids for p in prompts]
  engine.backend.fail_on = prompts[1]
  hs = [engine.submit(p, params) for p in prompts]
  extra = engine.submit(prompts[0], params)  # queued behind the three
  engine.step()
  engine.step()
  hs[2].cancel()
  engine.run_until_idle()
  engine.backend.fail_on = None
  assert hs[0].result().token_ids == want[0] and extra.result().token_ids == want[0]
  with pytest.raises(EngineError, match="injected prefill failure"):
    hs[1].result()
  c = hs[2].result()
  assert c.finish_reason == "cancelled" and c.token_ids == want[2][:len(c.token_ids)] and len(c.token_ids) == 2
  assert engine._free == [0, 1, 2] and not engine._running


def test_background_thread_serves_concurrent_submitters(engine, tok):
  prompts = [[tok.bos_id] + tok.encode(p) for p, _ in REQUESTS]
  want = [run(engine, p, params).token_ids for p, (_, params) in zip(prompts, REQUESTS)]
  engine.start()
  try:
    got = [None] * len(prompts)

    def client(i):
      got[i] = engine.submit(prompts[i], REQUESTS[i][1]).result(timeout=120).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert got == want
  finally:
    engine.shutdown()
  with pytest.raises(EngineError, match="shut down"):
    engine.submit(prompts[0], SP())


# ----- text: stop strings, stop tokens, UTF-8 ---------------------------------------------------------------------
def test_stop_string_truncates_and_is_never_streamed(tok):
  eng = scripted(tok, "hello world. Stop here. The end.")
  seen = []
  h = eng.submit([tok.bos_id], SP(max_tokens=50, stop=("here.", "xyz")), on_delta=seen.append)
  eng.run_until_idle()
  c = h.result()
  assert c.text == "hello world. Stop " and "".join(seen) == c.text
  assert (c.finish_reason, c.stop_reason) == ("stop", "here.")
  assert c.completion_tokens == len(c.token_ids) and tok.decode(c.token_ids).startswith(c.text + "here")
  # a partial match that does not complete is released in the end
  c = run(scripted(tok, "hello world. Stop"), [tok.bos_id], SP(max_tokens=50, stop=("Stop here",)))
  assert c.text == "hello world. Stop" and c.finish_reason == "stop" and c.stop_reason == tok.eos_id


def test_stop_token_ids_and_eos(tok):
  ids = tok.encode("hello world. The end.")
  eng = scripted(tok, ids)
  c = run(eng, [tok.bos_id], SP(max_tokens=50))
  assert c.text == "hello world. The end." and (c.finish_reason, c.stop_reason) == ("stop", tok.eos_id)
  assert c.token_ids == ids + [tok.eos_id]
  c = run(eng, [tok.bos_id], SP(max_tokens=50, stop_token_ids=(ids[3],)))
  assert c.token_ids == ids[:4] and c.text == tok.decode(ids[:3]) and c.stop_reason == ids[3]
  c = run(eng, [tok.bos_id], SP(max_tokens=len(ids) + 3, ignore_eos=True))
  assert c.token_ids == ids + [tok.eos_id] * 3 and c.finish_reason == "length"


def _byte_tokens(tok, text):
  """One token per UTF-8 byte (the byte-level alphabet's characters), so characters split across tokens."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  char = dict(zip(bs, map(chr, cs)))
  return [tok.tokenizer.token_to_id(char[b]) for b in text.encode("utf-8")]


def test_streaming_never_splits_a_character_or_a_stop_string(tok):
  text = "naïve 你好 世界!"
  ids = _byte_tokens(tok, text)
  assert None not in ids and tok.decode(ids) == text
  stream = TextStream(tok)
  deltas = [stream.push(i) for i in ids] + [stream.finish()]
  assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
  assert [d for d in deltas if d] == list(text)  # each character once all its bytes are in
  stream, deltas = TextStream(tok, stop=("好 世",)), []
  for i in ids:
    deltas.append(stream.push(i))
    if stream.stop_hit:
      break
  assert "".join(deltas) == "naïve 你" and stream.stop_hit == "好 世" and deltas[-1] == ""
  # a cut-off byte sequence at the very end comes out as a replacement character
  stream = TextStream(tok)
  assert "".join([stream.push(i) for i in ids[:8]]) == "naïve " and stream.finish() == "\ufffd"


# ----- chat -------------------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "adds",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]


@pytest.mark.parametrize("mode", ["chat", "thinking", "max"])
def test_chat_mode_encoding_reaches_the_model(tok, mode):
  eng = scripted(tok, "4")
  h = eng.submit_chat(MESSAGES, SP(max_tokens=5), mode=mode)
  eng.run_until_idle()
  thinking_mode, effort = resolve_mode(mode)
  prompt = encode_messages(MESSAGES, thinking_mode, reasoning_effort=effort)
  assert eng.backend.prefills == [tok.encode(prompt)]
  assert prompt.endswith(ASSISTANT + (THINK_START if mode != "chat" else THINK_END))
  assert (REASONING_EFFORT_MAX_PREFIX in prompt) == (mode == "max")
  assert h.thinking_mode == thinking_mode and h.result().thinking_mode == thinking_mode
  # tools go into the system message
  eng.submit_chat(MESSAGES, SP(max_tokens=2), mode=mode, tools=TOOLS)
  eng.run_until_idle()
  with_tools = [dict(MESSAGES[0], tools=TOOLS), MESSAGES[1]]
  assert eng.backend.prefills[-1] == tok.encode(encode_messages(with_tools, thinking_mode, reasoning_effort=effort))


CALL = [{"name": "add", "arguments": '{"a": 2, "b": "two"}'}]


def test_chat_completion_parsed_into_reasoning_content_and_tool_calls(tok):
  completion = "Two plus two." + THINK_END + "Let me add." + encode_tool_calls(CALL)
  eng = scripted(tok, completion)
  c = eng.submit_chat(MESSAGES, SP(max_tokens=200), mode="thinking", tools=TOOLS)
  eng.run_until_idle()
  c = c.result()
  assert c.finish_reason == "stop" and c.text == completion
  assert c.message == {"content": "Let me add.", "reasoning_content": "Two plus two.",
                       "tool_calls": [{"type": "function", "function": CALL[0]}]}
  # Non-think: all content; cut off by max_tokens: the plain split, no tool calls
  eng = scripted(tok, "The answer is 4." + EOS)
  h = eng.submit_chat(MESSAGES, SP(max_tokens=50), mode="chat")
  eng.run_until_idle()
  assert h.result().message == {"content": "The answer is 4.", "reasoning_content": "", "tool_calls": []}
  assert parse_completion("still thinking", "thinking") == {"content": "", "reasoning_content": "still thinking",
                                                              "tool_calls": []}


@pytest.mark.parametrize("thinking_mode", ["thinking", "chat"])
def test_chat_stream_splitter_agrees_with_the_parse(thinking_mode):
  text = ("Two plus two." + THINK_END if thinking_mode == "thinking" else "") + "Let me add." + \
      encode_tool_calls(CALL)
  for step in (1, 3, 7, len(text)):
    s = ChatStreamSplitter(thinking_mode)
    parts = [p for i in range(0, len(text), step) for p in s.feed(text[i:i + step])] + s.finish(True)
    fields = {}
    for field, part in parts:
      fields[field] = fields.get(field, "") + part
    msg = parse_completion(text, thinking_mode)
    want = {k: v for k, v in (("content", msg["content"]), ("reasoning_content", msg["reasoning_content"])) if v}
    assert fields == want and msg["tool_calls"]
  s = ChatStreamSplitter("chat")  # tool text that did not parse is released as content
  assert s.feed("a\n\n<｜DSML｜tool_calls>junk") == [("content", "a")]
  assert s.finish(False) == [("content", "\n\n<｜DSML｜tool_calls>junk")]


# ----- the cached backend (its slot release is pending: the KV cache lands separately) -----------------------------
def test_make_backend_picks_the_cached_backend_only_when_complete(model):
  assert isinstance(make_backend(model, 2, 64, "full"), FullForwardBackend)
  auto = make_backend(model, 2, 64)
  assert isinstance(auto, CachedBackend) == (hasattr(DeepSeekV4, "init_cache") and release_op() is not None)


@pytest.mark.skipif(not hasattr(DeepSeekV4, "init_cache"), reason="the KV cache (model.init_cache) has not landed")
def test_cached_backend_matches_the_full_forward(model, tok):
  """Every request in its own slot (no slot reuse, so no release needed): the same tokens as the full forward,
  batched or alone; with the release operation, also with more requests than slots."""
  prompts = [[tok.bos_id] + tok.encode(p) for p, _ in REQUESTS]
  params = [p for _, p in REQUESTS]
  full = Engine(FullForwardBackend(model, 3, 64), tok)
  hs = [full.submit(p, s) for p, s in zip(prompts, params)]
  full.run_until_idle()
  want = [h.result().token_ids for h in hs]
  cached = Engine(CachedBackend(model, len(prompts), 64, kv_format="float32", release=lambda cache, slot: cache),
                  tok)
  hs = [cached.submit(p, s) for p, s in zip(prompts, params)]
  cached.run_until_idle()
  assert [h.result().token_ids for h in hs] == want
  if release_op() is not None:
    reuse = Engine(make_backend(model, 2, 64, "cached", kv_format="float32"), tok)
    hs = [reuse.submit(p, s) for p, s in zip(prompts, params)] + [reuse.submit(prompts[0], params[0])]
    reuse.run_until_idle()
    assert [h.result().token_ids for h in hs] == want + want[:1]
