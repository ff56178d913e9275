"""Tokenizer: DeepSeek-V4 special tokens and ids, byte-level round trip, determinism, files and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4_jax.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, train_bpe

CORPUS = [
  "def add(a, b):\n    return a + b\n",
  "class Foo:\n    \"\"\"A docstring.\"\"\"\n    x = 12345\n",
  "The quick brown fox jumps over the lazy dog. " * 5,
  "Grüße, 世界! Здравствуй, мир. 🚀🚀 ¿Qué tal?",
  "for i in range(10):\n    print(i, i ** 2)\n" * 3,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  return train_bpe(CORPUS * 4, vocab_size=400)


def test_special_token_strings_are_exact():
  assert SPECIAL_TOKENS["bos"] == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
  assert SPECIAL_TOKENS["eos"] == "<\uff5cend\u2581of\u2581sentence\uff5c>"
  assert SPECIAL_TOKENS["user"] == "<\uff5cUser\uff5c>"
  assert SPECIAL_TOKENS["assistant"] == "<\uff5cAssistant\uff5c>"
  assert SPECIAL_TOKENS["dsml"] == "\uff5cDSML\uff5c"
  assert (SPECIAL_TOKENS["think"], SPECIAL_TOKENS["end_think"]) == ("<think>", "</think>")
  for task in ("action", "query", "authority", "domain", "title", "extracted_url", "read_url"):
    assert SPECIAL_TOKENS[task] == f"<\uff5c{task}\uff5c>"


def test_special_token_ids(tok):
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
  assert tok.token_id("<｜begin▁of▁sentence｜>") == 0
  assert tok.token_id("<｜end▁of▁sentence｜>") == 1
  assert [tok.token_id(name) for name in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
  assert tok.token_id("think") == tok.token_id("<think>")
  with pytest.raises(KeyError, match="no token 'nonexistent'"):
    tok.token_id("nonexistent")


def test_special_tokens_in_text(tok):
  text = "<｜User｜>hi<｜Assistant｜><think>hmm</think>ok<｜end▁of▁sentence｜>"
  ids = tok.encode(text)
  for name in ("user", "assistant", "think", "end_think", "eos"):
    assert ids.count(tok.token_id(name)) == 1
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=True) == "hihmmok"


def test_encode_adds_nothing_and_batches(tok):
  ids = tok.encode("def add(a, b):")
  assert ids and tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.encode_batch(CORPUS) == [tok.encode(t) for t in CORPUS]
  assert tok.encode("") == []


def test_vocab_size_is_reached_and_bounded(tok):
  assert tok.vocab_size == 400
  assert max(tok.tokenizer.get_vocab().values()) == 399


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_round_trip_unicode_examples(tok):
  for text in ["", " ", "\n\r\n\t", "\x00\x01\x7f", "é vs e\u0301", "日本語のテキスト", "👩‍👩‍👧 ZWJ", "\U0010ffff",
               "  leading and trailing  ", "a" * 1000, "｜▁", "<｜User", "12345678901234567890"]:
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_in_groups_of_three(tok):
  pieces = [tok.decode([i]) for i in tok.encode("1234567")]
  assert all(len(p) <= 3 for p in pieces)


def test_training_is_deterministic(tok):
  assert train_bpe(CORPUS * 4, vocab_size=400).tokenizer.to_str() == tok.tokenizer.to_str()
  # And across processes (hash seeds differ).
  code = ("import sys, json; from dsv4_jax.tokenizer import train_bpe; "
          "print(train_bpe(json.loads(sys.argv[1]), vocab_size=400).tokenizer.to_str())")
  out = subprocess.run([sys.executable, "-c", code, json.dumps(CORPUS * 4)], capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == tok.tokenizer.to_str().strip()


def test_save_load(tok, tmp_path):
  assert tok.save(tmp_path) == str(tmp_path / "tokenizer.json")
  for path in (tmp_path, tmp_path / "tokenizer.json"):
    loaded = Tokenizer.load(path)
    assert loaded.tokenizer.to_str() == tok.tokenizer.to_str()
    assert loaded.encode(CORPUS[3]) == tok.encode(CORPUS[3])
  other = tmp_path / "sub" / "my.json"
  tok.save(other)
  assert Tokenizer.load(other).vocab_size == tok.vocab_size


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
    Tokenizer.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer.load(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    Tokenizer.load(tmp_path / "bad.json")


def test_vocab_size_too_small():
  with pytest.raises(ValueError, match=f">= {MIN_VOCAB_SIZE}"):
    train_bpe(CORPUS, vocab_size=100)
