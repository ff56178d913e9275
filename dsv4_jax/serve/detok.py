"""Streaming detokenization: token ids in, text deltas out, never splitting a UTF-8 character or a stop string.

  stream = TextStream(tokenizer, stop=("\\n\\n",))
  delta = stream.push(token_id)      # text now safe to show ("" while a character or a stop string is partial)
  stream.stop_hit                    # the stop string found (then stop pushing), else None
  tail = stream.finish()             # whatever was held back, at the end of a completion not ended by a stop
  stream.text                        # all text shown: the concatenation of every delta
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
  """Incremental decode: the text of each new token once its characters are complete.

  Decodes a short window (the tokens since the last complete character plus the ones before them, for decoders
  whose output depends on the previous token) instead of the whole sequence each time.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self._prefix = 0  # window start
    self._read = 0  # tokens before this are already in the returned text

  def _decode(self, ids) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=False)

  def push(self, token_id: int) -> str:
    """Text completed by this token ("" while its last character is still partial)."""
    self.ids.append(int(token_id))
    return self._advance(final=False)

  def flush(self) -> str:
    """Text held back so far (a partial character decodes as U+FFFD)."""
    return self._advance(final=True)

  def _advance(self, final: bool) -> str:
    if self._read == len(self.ids):
      return ""
    before = self._decode(self.ids[self._prefix:self._read])
    text = self._decode(self.ids[self._prefix:])
    if text.endswith(REPLACEMENT) and not final:
      return ""  # an incomplete UTF-8 sequence: wait for its next bytes
    if not text.startswith(before):  # a decoder that rewrote earlier text: show only what is new
      before = text[:len(before)]
    self._prefix, self._read = self._read, len(self.ids)
    return text[len(before):]


class TextStream:
  """Detokenizer plus stop strings: text is released only when no stop string could still start in it."""

  def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
    self.detok = Detokenizer(tokenizer)
    self.stop = tuple(stop)
    self.stop_hit: str | None = None
    self.text = ""  # everything released
    self._pending = ""  # decoded, not yet released

  def push(self, token_id: int) -> str:
    if self.stop_hit is not None:
      raise RuntimeError("TextStream: push after a stop string ended the text")
    self._pending += self.detok.push(token_id)
    return self._release()

  def finish(self) -> str:
    """Releases everything held back (the completion ended without a stop string)."""
    if self.stop_hit is not None:
      return ""
    self._pending += self.detok.flush()
    out = self._release()  # a stop string may still complete here
    if self.stop_hit is None:
      out += self._pending
      self.text += self._pending
      self._pending = ""
    return out

  def _release(self) -> str:
    # Every future stop occurrence starts inside _pending (a suffix that could begin one is never released).
    first, hit = len(self._pending), None
    for s in self.stop:
      at = self._pending.find(s)
      if at != -1 and (at < first or (at == first and hit is not None and len(s) > len(hit))):
        first, hit = at, s
    if hit is not None:
      out, self._pending, self.stop_hit = self._pending[:first], "", hit
    else:
      keep = max((_overlap(self._pending, s) for s in self.stop), default=0)
      out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
    self.text += out
    return out


def _overlap(text: str, stop: str) -> int:
  """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
  for n in range(min(len(text), len(stop) - 1), 0, -1):
    if text.endswith(stop[:n]):
      return n
  return 0
