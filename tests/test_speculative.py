"""MTP speculative decoding (dsv4_jax.serve.speculative) == plain decoding.

A random tiny model (all layer types; window 16, CSA blocks 4, HCA blocks 128) with the test tokenizer's vocabulary
(tests/serve_fixtures.py). The reference is the plain cached backend (one token per step, independent code path).
Checked: the cached MTP block == the full forward's mtp_logits; speculative tokens == plain greedy tokens for rows
of different prompt lengths crossing window / block boundaries, with drafts that are always right (acceptance 1.0),
always wrong (0.0), a random mix, and the MTP block's own; the cache after speculation == the plain cache at the
same lengths (lengths, window rings, compressor tails, every finished compressed entry); through the engine, greedy
and sampled requests with slot reuse give the same tokens as the plain engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.model.cache import init_mtp_cache
from dsv4_jax.model.decode import mtp_forward
from dsv4_jax.serve.cached_backend import CachedBackend
from dsv4_jax.serve.engine import Engine
from dsv4_jax.serve.params import SamplingParams as SP
from dsv4_jax.serve.speculative import SpecStats, SpeculativeBackend
from serve_fixtures import model, tok  # noqa: F401 (fixtures)

SLOTS, MAX_LEN, BUCKET = 3, 160, 128
PROMPTS = (1, 9, 121)  # row 0 crosses the 16-token window twice, row 2 the first HCA block (128)
STEPS = 18  # speculative steps per row: up to 36 tokens


@pytest.fixture(scope="module")
def plain(model):
  return CachedBackend(model, SLOTS, MAX_LEN, kv_format="float32", bucket=BUCKET)


@pytest.fixture(scope="module")
def spec(model):
  return SpeculativeBackend(model, SLOTS, MAX_LEN, kv_format="float32", bucket=BUCKET)


@pytest.fixture(scope="module")
def prompts(model):
  rng = np.random.default_rng(1)
  return [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in PROMPTS]


def _release_all(backend):
  for slot in range(backend.num_slots):
    if backend._lengths[slot] is not None:
      backend.release(slot)


def _plain_greedy(backend, prompts, lengths=None, forced=None):
  """Greedy tokens of each slot (prompt i in slot i) and the backend's cache, one token per step. Row i stops when
  its cache holds lengths[i] tokens (default: len(prompt) + 2·STEPS + 1). forced: feed these tokens instead of
  the argmax (teacher forcing); the argmax is still what is returned."""
  lengths = [len(p) + 2 * STEPS + 1 for p in prompts] if lengths is None else lengths
  out = [[int(jnp.argmax(backend.prefill(i, p)))] for i, p in enumerate(prompts)]
  while True:
    rows = [i for i, p in enumerate(prompts) if len(p) + len(out[i]) - 1 < lengths[i]]
    if not rows:
      return out, backend.cache
    feed = [(forced[i] if forced is not None else out[i])[len(out[i]) - 1] for i in rows]
    logits = backend.decode(rows, feed)
    for i, row in zip(rows, np.asarray(jnp.argmax(logits, -1))):
      out[i].append(int(row))


@pytest.fixture(scope="module")
def reference(plain, prompts):
  tokens, _ = _plain_greedy(plain, prompts)
  _release_all(plain)
  return tokens


def _speculate(spec, prompts, draft_mode, reference, steps=STEPS):
  """Emitted tokens per slot after `steps` speculative steps (greedy), and the statistics of those steps."""
  spec.stats = SpecStats()
  rng = np.random.default_rng(7)
  gen = [[int(jnp.argmax(spec.prefill(i, p)))] for i, p in enumerate(prompts)]

  def drafts(backend):  # the test double: the draft for the token after each slot's last one
    right = np.array([reference[i][min(len(gen[i]), len(reference[i]) - 1)] for i in range(SLOTS)], np.int32)
    wrong = (right + 1) % backend.vocab_size
    pick = {"right": np.ones(SLOTS, bool), "wrong": np.zeros(SLOTS, bool), "mixed": rng.random(SLOTS) < 0.5}
    return np.where(pick[draft_mode], right, wrong)

  spec.forced_draft = None if draft_mode == "mtp" else drafts
  try:
    for _ in range(steps):
      rows = list(range(SLOTS))
      toks, kept = spec.speculate(rows, [g[-1] for g in gen], [SP(seed=0)] * SLOTS, [len(g) for g in gen],
                                  [1000] * SLOTS)
      for i, t, n in zip(rows, toks, kept):
        assert n in (1, 2)
        gen[i] += [int(x) for x in t[:n]]
  finally:
    spec.forced_draft = None
  return gen, spec.stats


def test_cached_mtp_block_matches_the_forward(model, prompts):
  """mtp_forward over a prompt in uneven chunks == the full forward's mtp_logits at every position."""
  tokens = np.asarray(prompts[2][:40] + prompts[1][:9], np.int32)[None]  # 49 tokens: 3 windows, 12 CSA blocks
  out = model(jnp.asarray(tokens))
  cache = init_mtp_cache(model.cfg, 1, 64, kv_format="float32")
  nxt = np.concatenate([tokens[:, 1:], np.zeros((1, 1), np.int32)], 1)
  W = 20  # chunks padded to one width (one compile), `counts` valid
  h = jnp.pad(out.hidden, ((0, 0), (0, W), (0, 0), (0, 0)))
  nxt = np.pad(nxt, ((0, 0), (0, W)))
  step = jax.jit(lambda h, t, c, n: mtp_forward(model, h, t, c, n))
  got, at = [], 0
  for n in (17, 1, 2, 2, 20, 7):
    logits, cache = step(h[:, at:at + W], jnp.asarray(nxt[:, at:at + W]), cache, jnp.asarray([n]))
    got.append(np.asarray(logits[0, :n]))
    at += n
  got = np.concatenate(got)[:-1]  # the last position has no next token
  want = np.asarray(out.mtp_logits[0, :-1])
  err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
  assert err.max() <= 1e-4, f"position {err.argmax()}: relative error {err.max():.2e}"
  assert int(cache.lengths[0]) == 49


@pytest.mark.parametrize("draft_mode", ["right", "wrong", "mixed", "mtp"])
def test_speculative_greedy_equals_plain(spec, prompts, reference, draft_mode):
  gen, stats = _speculate(spec, prompts, draft_mode, reference)
  try:
    for i in range(SLOTS):
      assert gen[i] == reference[i][:len(gen[i])], f"slot {i} (prompt of {PROMPTS[i]} tokens)"
    assert stats.drafted == STEPS * SLOTS and stats.emitted == sum(len(g) - 1 for g in gen)
    if draft_mode == "right":
      assert stats.acceptance_rate == 1.0 and all(len(g) == 2 * STEPS + 1 for g in gen)
    elif draft_mode == "wrong":
      assert stats.accepted == 0 and all(len(g) == STEPS + 1 for g in gen)
    elif draft_mode == "mixed":
      assert 0 < stats.accepted < stats.drafted
    else:  # a random model's MTP block rarely guesses its main model's argmax
      assert stats.acceptance_rate < 0.5
  finally:
    _release_all(spec)


def _finished_entries(cache, pool, ratio, r, slot):
  """Slot's finished entries of layer r of a pool, in sequence order [floor(length / ratio), E]."""
  rows = np.asarray(pool)[r][np.maximum(np.asarray(cache.page_table[slot]), 0)].reshape(-1, pool.shape[-1])
  return rows[:int(cache.lengths[slot]) // ratio]


def test_speculative_cache_equals_plain_cache(spec, plain, prompts, reference):
  """After a mix of accepted and rejected drafts, the cache holds what plain decoding of the same tokens holds."""
  gen, _ = _speculate(spec, prompts, "mixed", reference, steps=STEPS - 5)
  try:
    got = spec.cache
    lengths = [int(n) for n in np.asarray(got.lengths)]
    assert lengths == [len(p) + len(g) - 1 for p, g in zip(prompts, gen)]
    _, want = _plain_greedy(plain, prompts, lengths, forced=gen)
    np.testing.assert_array_equal(np.asarray(want.lengths), lengths)
    for a, b in zip(jax.tree.leaves(got.states), jax.tree.leaves(want.states)):  # rings and compressor tails
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    T = got.page_tokens
    for pa, pb in zip(jax.tree.leaves(got.pools), jax.tree.leaves(want.pools)):
      ratio = T // pa.shape[2]
      for r in range(pa.shape[0]):
        for slot in range(SLOTS):
          np.testing.assert_allclose(_finished_entries(got, pa, ratio, r, slot),
                                     _finished_entries(want, pb, ratio, r, slot), rtol=1e-5, atol=1e-5)
  finally:
    _release_all(spec)
    _release_all(plain)


REQUESTS = [  # more requests than slots (slot reuse), greedy and sampled, different prompt lengths
  ("hello world", SP(max_tokens=12, seed=1, ignore_eos=True)),
  ("the quick brown fox jumps over the lazy dog. def f(x): return", SP(max_tokens=7, temperature=1.0, seed=2)),
  ("c", SP(max_tokens=15, temperature=0.8, top_k=20, seed=3, ignore_eos=True)),
  ("def f", SP(max_tokens=5, temperature=1.0, top_p=0.9, seed=4)),
  ("the lazy dog", SP(max_tokens=9, ignore_eos=True, stop_token_ids=(7,))),
]


def test_engine_speculative_equals_plain_engine(spec, plain, tok):
  prompts = [[tok.bos_id] + tok.encode(p) for p, _ in REQUESTS]
  outs = []
  for backend in (plain, spec):
    engine = Engine(backend, tok)
    handles = [engine.submit(p, params) for p, (_, params) in zip(prompts, REQUESTS)]
    engine.run_until_idle()
    outs.append([(h.result().token_ids, h.result().finish_reason) for h in handles])
  assert outs[1] == outs[0]
  stats = engine.stats
  assert isinstance(stats, SpecStats) and stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1
  assert 1 <= stats.tokens_per_step <= 2 and "drafts accepted" in stats.summary()
  assert all(n is None for n in spec._lengths) and int(spec.draft.cache.num_free) == spec.draft.cache.num_pages


def test_bad_inputs(model, spec):
  with pytest.raises(ValueError, match="MTP block"):
    SpeculativeBackend(_without_mtp(model), 1, 32)
  with pytest.raises(ValueError, match="MTP block's own cache"):
    mtp_forward(model, jnp.zeros((SLOTS, 1, model.cfg.hc_mult, model.cfg.hidden_size)), jnp.zeros((SLOTS, 1)),
                spec.cache)
  with pytest.raises(ValueError, match="h_BSND"):
    mtp_forward(model, jnp.zeros((SLOTS, 2, 1, 1)), jnp.zeros((SLOTS, 2)), spec.draft.cache)
  with pytest.raises(RuntimeError, match="holds no sequence"):
    spec.speculate([0], [1], [SP(seed=0)], [0], [5])


def _without_mtp(model):
  class NoMTP:
    cfg, mtp = model.cfg, ()
  return NoMTP()


def test_cli_speculative_flag(model):
  """`--speculative` on generate and serve picks the speculative backend (which needs the KV cache)."""
  from dsv4_jax import cli
  parser = cli.build_parser()
  for cmd in (["generate", "--prompt", "x"], ["serve"]):
    args = parser.parse_args(cmd + ["--checkpoint", "d", "--speculative"])
    assert args.speculative and not parser.parse_args(cmd + ["--checkpoint", "d"]).speculative
  backend = cli._serving_backend(model, 1, 32, "auto", True)
  assert isinstance(backend, SpeculativeBackend) and backend.max_len == 32
  with pytest.raises(ValueError, match="--backend full"):
    cli._serving_backend(model, 1, 32, "full", True)
