"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` with the DeepSeek-V4 special tokens (spec §13).

  tok = train_bpe(texts, vocab_size=8192)    # byte-level BPE; BOS id 0, EOS id 1, then the other specials
  tok.save("workdir")                        # workdir/tokenizer.json
  tok = Tokenizer.load("workdir")            # a tokenizer.json file, or a directory holding one
  ids = tok.encode("def f(): pass")          # no BOS/EOS added (the official add_bos_token is false)
  tok.decode(ids) == "def f(): pass"         # byte-level: any text round-trips
  tok.token_id("think"), tok.bos_id, tok.eos_id, tok.pad_id   # pad is EOS, as in the official config

Any Hugging Face `tokenizer.json` loads (the official DeepSeek-V4 one too); `token_id` then finds the special
tokens by their strings. Special-token strings inside `encode`'s text are matched as special tokens, as the
`tokenizers` library does by default.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

# Name -> token string, in id order for `train_bpe` (BOS id 0, EOS id 1). Note the full-width ｜ (U+FF5C) and
# ▁ (U+2581).
SPECIAL_TOKENS: dict[str, str] = {
  "bos": "<｜begin▁of▁sentence｜>",
  "eos": "<｜end▁of▁sentence｜>",
  "user": "<｜User｜>",
  "assistant": "<｜Assistant｜>",
  "latest_reminder": "<｜latest_reminder｜>",
  "think": "<think>",
  "end_think": "</think>",
  "dsml": "｜DSML｜",
  # Quick Instruction task tokens.
  "action": "<｜action｜>",
  "query": "<｜query｜>",
  "authority": "<｜authority｜>",
  "domain": "<｜domain｜>",
  "title": "<｜title｜>",
  "extracted_url": "<｜extracted_url｜>",
  "read_url": "<｜read_url｜>",
}
# Names that point at another special token.
ALIASES = {"pad": "eos"}
FILE_NAME = "tokenizer.json"
# Byte-level alphabet: every byte is a base token, so no text is out of vocabulary.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
  """A `tokenizers.Tokenizer` plus special-token lookup by name."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self.tokenizer = tokenizer

  # ----- files ----------------------------------------------------------------------------------------------
  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer.json file, or DIR/tokenizer.json."""
    path = os.fspath(path)
    file = os.path.join(path, FILE_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
      where = f"directory {path!r} has no {FILE_NAME}" if os.path.isdir(path) else f"{path!r} does not exist"
      raise FileNotFoundError(f"tokenizer: {where} (expected a {FILE_NAME} file or a directory holding one)")
    try:
      return cls(tokenizers.Tokenizer.from_file(file))
    except Exception as e:  # the Rust side raises a bare Exception
      raise ValueError(f"tokenizer: cannot read {file!r} as a Hugging Face tokenizer.json: {e}") from e

  def save(self, path: str | os.PathLike) -> str:
    """Writes tokenizer.json (into PATH if it is a directory) atomically; returns the file written."""
    path = os.fspath(path)
    file = os.path.join(path, FILE_NAME) if os.path.isdir(path) else path
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(file)), suffix=".tmp")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(self.tokenizer.to_str(pretty=True))
      os.replace(tmp, file)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    return file

  # ----- text <-> ids ---------------------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    """Token ids of TEXT, without BOS/EOS."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, in parallel in the Rust library."""
    return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # ----- vocabulary -----------------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (ids are 0 .. vocab_size - 1)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token_id(self, name_or_string: str) -> int:
    """Id of a special token by name ("bos", "eos", "pad", "think", "query", ...) or of any token string."""
    name = ALIASES.get(name_or_string, name_or_string)
    string = SPECIAL_TOKENS.get(name, name_or_string)
    i = self.tokenizer.token_to_id(string)
    if i is None:
      known = ", ".join([*SPECIAL_TOKENS, *ALIASES])
      raise KeyError(f"tokenizer: no token {string!r} in the vocabulary (special-token names: {known})")
    return i

  @property
  def bos_id(self) -> int:
    return self.token_id("bos")

  @property
  def eos_id(self) -> int:
    return self.token_id("eos")

  @property
  def pad_id(self) -> int:
    return self.token_id("pad")

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size})"


def _byte_level_bpe() -> tokenizers.Tokenizer:
  """An untrained byte-level BPE: digits in groups of up to 3 (as DeepSeek-V3), then GPT-2's split regex."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(r"\p{N}{1,3}"), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  return tok


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
  """Trains a byte-level BPE on TEXTS with the DeepSeek-V4 special tokens first (BOS id 0, EOS id 1).

  VOCAB_SIZE counts the specials and the 256 byte tokens; it is an upper bound (a small corpus may run out of
  merges first). The result depends only on the texts and their order.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(
      f"train_bpe: vocab_size = {vocab_size} is too small; it must be >= {MIN_VOCAB_SIZE} "
      f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
  tok = _byte_level_bpe()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS.values()),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
  tok.train_from_iterator(texts, trainer=trainer)
  out = Tokenizer(tok)
  for i, (name, string) in enumerate(SPECIAL_TOKENS.items()):
    if out.tokenizer.token_to_id(string) != i:
      raise AssertionError(f"train_bpe: special token {name} ({string!r}) did not get id {i}")
  return out

