"""A serving-engine backend for tests: its logits spell out a fixed completion, so greedy decoding emits exactly
`script(prompt_ids)` token by token (then EOS forever). Records the prompts it was given."""

from __future__ import annotations

import jax.numpy as jnp


class Script:
  def __init__(self, vocab_size, script, eos_id, num_slots=2, max_len=4096):
    self.vocab_size, self.num_slots, self.max_len = vocab_size, num_slots, max_len
    self.script, self.eos_id = script, eos_id
    self.slots, self.prefills = {}, []

  def _logits(self, slot):
    seq, n = self.slots[slot]
    tok = seq[n] if n < len(seq) else self.eos_id
    return jnp.zeros(self.vocab_size).at[tok].set(30.0)

  def prefill(self, slot, ids):
    self.prefills.append(list(ids))
    self.slots[slot] = [list(self.script(list(ids))), 0]
    return self._logits(slot)

  def decode(self, slots, tokens):
    for s in slots:
      self.slots[s][1] += 1
    return jnp.stack([self._logits(s) for s in slots])

  def release(self, slot):
    del self.slots[slot]
