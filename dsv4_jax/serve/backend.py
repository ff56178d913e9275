"""What the engine needs from a model: a fixed set of slots, each holding one sequence.

  backend.prefill(slot, prompt_ids) -> logits [V]          the slot now holds the prompt
  backend.decode(slots, tokens)     -> logits [len(slots), V]  each slot's sequence grows by its token
  backend.release(slot)                                    the slot is free for another sequence
  backend.fork(src, dst)                                   dst continues src's sequence (Quick Instruction)
  backend.extend(slots, token_lists) -> logits [len(slots), V]  each slot's sequence grows by its tokens

Optional, for the engine's dispatch-ahead mode (CachedBackend has them): the next token drawn on the device and
kept there as the slot's next input, read later (DrawnTokens.read()), so a step is dispatched before the previous
one's tokens reach the host:
  backend.prefill_sample(slot, prompt_ids, rows) -> DrawnTokens     rows: SamplingRows of one row
  backend.decode_sample(slots, rows)             -> DrawnTokens     rows: SamplingRows of num_slots rows

Both backends serve `serving_model(model)`: routed experts on moe_impl "exact", which drops nothing (the capacity
path that moe_impl "auto" picks on GPU drops tokens past an expert's capacity, so a request's output would
depend on the batch it shares a step with): steps of few tokens (decode, MTP verification) run the capacity
einsums with capacity = tokens, faster than the ragged path there (H200, bench model, one layer's MoE at batch
64: 0.76 ms vs 1.25 ms), longer ones (prompts) the ragged path (moe.EXACT_CAPACITY_MAX_TOKENS).

A model built with scan_layers=False (or `dsv4_jax.unstack_layers(model)`) decodes faster: a scanned layer stack
copies each layer's expert weights out of the stack every step (H200, Flash-shaped bench model, 128K context,
batch 64: 16.0 ms a step unstacked vs 20.2 ms scanned); serving_model logs a warning for a scanned model whose
stacks repeat.

FullForwardBackend runs the model's plain forward over each slot's whole sequence every step (no cache): slow,
but exact and available for any model. CachedBackend (cached_backend.py) uses the KV cache when the model has
one. `make_backend` picks.
"""

from __future__ import annotations

import functools
import logging
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)


class Backend(Protocol):
  num_slots: int
  max_len: int  # tokens a slot holds: prompt + generated
  vocab_size: int

  def prefill(self, slot: int, prompt_ids: Sequence[int]) -> jax.Array: ...

  def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> jax.Array: ...

  def release(self, slot: int) -> None: ...


def serving_model(model):
  """`model` with moe_impl "exact" everywhere (exact MoE: no capacity drops); a new module object sharing the
  parameters (the caller's model is not changed); `model` itself if it is already on "exact". Warns for a model
  with scanned stacks of more than one repeat (not unstacked here: that would copy its main layers)."""
  repeats = max((r for _, r in getattr(model, "plan", ())), default=1)
  if repeats > 1:
    log.warning("serving a model with scanned layer stacks (up to %d repeats): each decode step copies the "
                "stacked expert weights (~20%% of an H200 decode step); build it with scan_layers=False, "
                "load_pretrained(..., scan_layers=False) or dsv4_jax.unstack_layers(model)", repeats)
  if model.cfg.moe_impl == "exact":
    return model
  graphdef, state = nnx.split(model)
  served = nnx.merge(graphdef, state)
  for _, module in nnx.iter_modules(served):
    cfg = getattr(module, "cfg", None)
    if cfg is not None and hasattr(cfg, "moe_impl"):
      module.cfg = cfg.replace(moe_impl="exact")
  return served


class FullForwardBackend:
  """Recomputes every slot's whole sequence each step (one batched forward, rows right-padded).

  The batch is always all `num_slots` rows and the length a multiple of `bucket`, so the forward compiles once
  per bucket; a row's logits do not depend on the other rows or the padding (causal model, row-wise ops), which
  makes a request's output identical alone or batched.
  """

  def __init__(self, model, num_slots: int, max_len: int | None = None, *, bucket: int = 64):
    limit = model.cfg.max_position_embeddings
    max_len = limit if max_len is None else max_len
    if num_slots < 1:
      raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if not 1 < max_len <= limit:
      raise ValueError(f"max_len must be in [2, {limit}] (the model's max_position_embeddings), got {max_len}")
    self.num_slots, self.max_len, self.bucket = num_slots, max_len, bucket
    model = serving_model(model)
    self.cfg, self.vocab_size = model.cfg, model.cfg.vocab_size
    self._seqs: list[list[int] | None] = [None] * num_slots
    graphdef, self._state = nnx.split(model)
    self._logits_at = _logits_at(graphdef)

  def prefill(self, slot, prompt_ids):
    if self._seqs[slot] is not None:
      raise RuntimeError(f"slot {slot} is in use; release it first")
    if not 0 < len(prompt_ids) <= self.max_len:
      raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit a slot of {self.max_len}")
    self._seqs[slot] = [int(t) for t in prompt_ids]
    return self._forward([slot])[0]

  def decode(self, slots, tokens):
    for slot, tok in zip(slots, tokens, strict=True):
      seq = self._seqs[slot]
      if seq is None:
        raise RuntimeError(f"slot {slot} holds no sequence")
      if len(seq) >= self.max_len:
        raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
      seq.append(int(tok))
    return self._forward(list(slots))

  def release(self, slot):
    self._seqs[slot] = None

  def fork(self, src, dst):
    if self._seqs[src] is None or self._seqs[dst] is not None or src == dst:
      raise RuntimeError(f"fork: slot {src} must hold a sequence and slot {dst} must be free")
    self._seqs[dst] = list(self._seqs[src])

  def extend(self, slots, token_lists):
    for slot, toks in zip(slots, token_lists, strict=True):
      seq = self._seqs[slot]
      if seq is None:
        raise RuntimeError(f"slot {slot} holds no sequence")
      if not toks or len(seq) + len(toks) > self.max_len:
        raise ValueError(f"slot {slot}: cannot add {len(toks)} tokens to {len(seq)} (max_len {self.max_len})")
      seq.extend(int(t) for t in toks)
    return self._forward(list(slots))

  def _forward(self, slots):
    longest = max(len(self._seqs[s]) for s in slots)
    S = -(-longest // self.bucket) * self.bucket
    tokens = np.zeros((self.num_slots, S), np.int32)
    last = np.zeros(self.num_slots, np.int32)
    for s in slots:  # other rows stay padding: they would only cost time
      seq = self._seqs[s]
      tokens[s, :len(seq)] = seq
      last[s] = len(seq) - 1
    logits = self._logits_at(self._state, jnp.asarray(tokens), jnp.asarray(last))
    return logits[jnp.asarray(slots)]


@functools.lru_cache(maxsize=8)
def _logits_at(graphdef):
  """The jitted forward for one model structure, shared by backends of equal structure (compiled once)."""

  @jax.jit
  def logits_at(state, tokens_BS, last_B):
    out = nnx.merge(graphdef, state)(tokens_BS, with_mtp=False)
    return out.logits[jnp.arange(tokens_BS.shape[0]), last_B]

  return logits_at


def make_backend(model, num_slots: int, max_len: int | None = None, kind: str = "auto", *,
                 kv_format: str | None = None) -> Backend:
  """kind "auto": the cached backend when the model has a KV cache with per-slot release, else the full forward;
  "cached" / "full" force one. kv_format: the cache's entry format (cached backend; None = the model's default)."""
  if kind not in ("auto", "cached", "full"):
    raise ValueError(f"backend kind must be auto, cached or full, got {kind!r}")
  from dsv4_jax.serve.cached_backend import CachedBackend, release_op
  if kind == "cached" or (kind == "auto" and hasattr(model, "init_cache") and release_op() is not None):
    return CachedBackend(model, num_slots, max_len, kv_format=kv_format)
  return FullForwardBackend(model, num_slots, max_len)
