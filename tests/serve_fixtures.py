"""Shared setup of the serving tests (engine, speculative decoding, Quick Instruction): one small BPE tokenizer,
the tiny random model with its vocabulary, a ~300-token conversation and its Quick Instruction prompts.

A test module imports the fixtures it uses by name (`from serve_fixtures import model, tok`): pytest registers
them per importing module, and the tokenizer's functools cache and conftest's model_factory make the tokenizer and
the model one per session. The model's weights are shared: tests must not change them. Backends and KV caches
(which the cache donation consumes, and requests fill) stay per module or per test; compiled programs are per
module (conftest drops them when a module ends).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from dsv4_jax.config import ModelConfig
from dsv4_jax.serve import quick_instruction as qi
from dsv4_jax.serve.chat import ASSISTANT, THINK_END
from dsv4_jax.tokenizer import train_bpe

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog. ", "def f(x):\n  return x + 1\n",
          "café naïve 你好 世界 ", "Stop here. The end."] * 8
TASKS = ["title", "domain", "query", "action"]  # Quick Instruction tasks: with 3 fork slots, two waves


@functools.cache
def serve_tokenizer():
  """Byte-level BPE (vocabulary 400) trained on CORPUS."""
  return train_bpe(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def tok():
  return serve_tokenizer()


@pytest.fixture(scope="module")
def model(tok, model_factory):
  """The tiny config with `tok`'s vocabulary, random weights (one per session: conftest's model_factory)."""
  return model_factory(ModelConfig.preset("tiny", vocab_size=tok.vocab_size))


@pytest.fixture(scope="module")
def messages():
  """A conversation of ~300 tokens: past one 256-token cache page, so forks share a full page (main and MTP
  caches)."""
  return [{"role": "system", "content": "You are terse."},
          {"role": "user", "content": "".join(CORPUS[:4]) * 7 + "Name this chat."}]


@pytest.fixture(scope="module")
def ids(tok, messages):
  """(conversation ids, {task: suffix ids} for TASKS, the parent's own continuation: the normal chat prompt)."""
  prefix_ids, suffix_ids = qi.encode_tasks(tok, messages, TASKS)
  assert 256 < len(prefix_ids) < 320  # past one 256-token page: the forks share it
  return prefix_ids, suffix_ids, tok.encode(ASSISTANT + THINK_END)


def greedy_decode(backend, slot, logits, n, eos_id):
  """Up to n greedy tokens from `logits` (after the slot's last token), one decode step each, stopping at EOS."""
  out = []
  for _ in range(n):
    t = int(np.argmax(np.asarray(logits).reshape(-1)))
    if t == eos_id:
      break
    out.append(t)
    logits = backend.decode([slot], [t])
  return out
