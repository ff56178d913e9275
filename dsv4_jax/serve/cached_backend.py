"""The engine backend over the model's KV cache: a prompt is prefilled into its slot once, then each step feeds
one token per running slot.

Uses the model's cached steps (`model.init_cache(batch, max_len, kv_format=...)`, `model.prefill(tokens, cache,
lengths, slots=...)`, `model.decode(tokens_B1, cache, active=...)`), jitted here with the cache donated.
Freeing a slot for the next request uses the cache's per-slot release operation (`release_slot` / `reset_slot`
(cache, slot) -> cache, looked up in dsv4_jax.serve.cache, serve.steps or model.cache).

Every step passes `max_context`, the longest row's length after the step rounded up to a power of two (at least
MIN_CONTEXT_BUCKET, at most max_len): the compressed entries are then read from the pages that can hold data,
not from the whole page table of a max_len slot; one compile per bucket.

Dispatch-ahead (what the engine uses): `decode_sample(slots, rows)` and `prefill_sample(slot, prompt_ids, rows)`
draw the next token on the device (dsv4_jax.serve.sampling.pick_tokens, fused into the step) and keep it there as
the slot's next input, so a step can be dispatched before the previous one's tokens reach the host. They return
DrawnTokens, read later; the cache's overflow flag comes back with them instead of being checked (a host sync)
after each step.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.serve.sampling import SamplingRows, pick_tokens

RELEASE_OP_PLACES = ("dsv4_jax.serve.cache", "dsv4_jax.serve.steps", "dsv4_jax.model.cache")
RELEASE_OP_NAMES = ("release_slot", "reset_slot")
MIN_CONTEXT_BUCKET = 1024  # smallest max_context bucket (tokens): few compiles for short sequences


def release_op():
  """The cache's per-slot release function (cache, slot) -> cache, or None while it does not exist."""
  for place in RELEASE_OP_PLACES:
    try:
      module = importlib.import_module(place)
    except ImportError:
      continue
    for name in RELEASE_OP_NAMES:
      if callable(getattr(module, name, None)):
        return getattr(module, name)
  return None


def padded_prompt(lengths, slot, prompt_ids, max_len: int, bucket: int):
  """(tokens [1, n rounded up to `bucket`] int32, n) for prefilling `prompt_ids` into free slot `slot` of a
  backend whose per-slot lengths are `lengths` (None = free); clear errors for a busy slot or a bad length."""
  if lengths[slot] is not None:
    raise RuntimeError(f"slot {slot} is in use; release it first")
  n = len(prompt_ids)
  if not 0 < n <= max_len:
    raise ValueError(f"prompt of {n} tokens does not fit a slot of {max_len}")
  tokens = np.zeros((1, -(-n // bucket) * bucket), np.int32)
  tokens[0, :n] = prompt_ids
  return tokens, n


def padded_extension(lengths, slots, token_lists, max_len: int, bucket: int):
  """(tokens [len(slots), width] int32, counts) for appending token_lists[i] to slot slots[i] of a backend whose
  per-slot lengths are `lengths`; width is a power of two up to `bucket`, then a multiple of it (few compiles).
  Clear errors for an empty slot or a row that would not fit."""
  n = [len(t) for t in token_lists]
  for slot, k in zip(slots, n, strict=True):
    if lengths[slot] is None:
      raise RuntimeError(f"slot {slot} holds no sequence")
    if k < 1 or lengths[slot] + k > max_len:
      raise ValueError(f"slot {slot}: cannot add {k} tokens to {lengths[slot]} (max_len {max_len})")
  width = 1 << (max(n) - 1).bit_length()
  width = width if width <= bucket else -(-max(n) // bucket) * bucket
  tokens = np.zeros((len(slots), width), np.int32)
  for row, toks in enumerate(token_lists):
    tokens[row, :len(toks)] = toks
  return tokens, n


OVERFLOW_MESSAGE = "the KV cache overflowed (out of pages or past max_len); its last writes were dropped"


@dataclasses.dataclass
class DrawnTokens:
  """Tokens a dispatch-ahead step drew on the device, on their way to the host (the copy starts at once).

  tokens_B [num_slots] int32: every slot's next input token after the step (the rows it drew, the others as
  they were); overflow: the cache's flag after it. `read()` waits for both; it raises if the cache overflowed."""
  tokens_B: jax.Array
  overflow: jax.Array

  def __post_init__(self):
    for x in (self.tokens_B, self.overflow):
      x.copy_to_host_async()

  def read(self) -> np.ndarray:
    if bool(self.overflow):
      raise RuntimeError(OVERFLOW_MESSAGE)
    return np.asarray(self.tokens_B)


class CachedBackend:
  """Slots are the rows of one batched cache. Prompts are right-padded to a multiple of `bucket` (one compile per
  bucket); decode always steps the whole batch with the free rows inactive (one compile).

  mesh: with the model's parameters born on a mesh (dsv4_jax.sharding.create_sharded), the cache is sharded on
  it (dsv4_jax.model.cache.cache_shardings) and every step pins that sharding (see dsv4_jax.serve.steps).

  Serve a model built with scan_layers=False (load_pretrained(..., scan_layers=False), or
  `dsv4_jax.unstack_layers(model)`, a copy of the main layers): a scanned stack's decode step copies each layer's
  expert weights out of the stack, 16.0 ms a step unstacked vs 20.2 ms scanned on an H200 (Flash-shaped bench
  model, 128K context, batch 64). The model is used as given (a warning is logged for a scanned one)."""

  def __init__(self, model, num_slots: int, max_len: int | None = None, *, kv_format: str | None = None,
               bucket: int = 64, release=None, mesh=None):
    if not hasattr(model, "init_cache"):
      raise NotImplementedError("this model has no KV cache (init_cache); use the full-forward backend")
    limit = model.cfg.max_position_embeddings
    max_len = limit if max_len is None else max_len
    if num_slots < 1 or not 1 < max_len <= limit:
      raise ValueError(f"need num_slots >= 1 and max_len in [2, {limit}], got {num_slots}, {max_len}")
    self.num_slots, self.max_len, self.vocab_size, self.bucket = num_slots, max_len, model.cfg.vocab_size, bucket
    from dsv4_jax.serve.backend import serving_model
    model = serving_model(model)  # exact MoE (moe_impl "exact")
    self.cfg = model.cfg
    self._release = release or release_op()
    kw = {} if kv_format is None else {"kv_format": kv_format}
    if mesh is not None:  # a free stack per shard of slots: decode reads each slot's pages on its own device
      from dsv4_jax.model.cache import mesh_page_shards
      kw["page_shards"] = mesh_page_shards(mesh, num_slots)
    self.cache = model.init_cache(num_slots, max_len, **kw)
    self._mesh = mesh
    self.cache = self._place(self.cache)
    if mesh is not None:
      from dsv4_jax.model.cache import cache_shardings
      shardings = cache_shardings(self.cache, mesh)
    def pin(n, outs=1):  # the cache (argument 1, last output) kept sharded; `outs` outputs before it
      return {} if mesh is None else dict(in_shardings=(None, shardings) + (None,) * (n - 2),
                                          out_shardings=(None,) * outs + (shardings,))
    self._lengths: list[int | None] = [None] * num_slots  # tokens in each slot; None = free
    graphdef, self._state = nnx.split(model)

    def step(n, statics=1, outs=1):  # n array arguments, then the static ones (max_context, ...): positional (jit
      return functools.partial(jax.jit, donate_argnums=(1,),  # with in_shardings takes no keyword arguments)
                               static_argnums=tuple(range(n, n + statics)), **pin(n, outs))

    @step(5)
    def prefill(state, cache, tokens_1S, length_1, slot_1, max_context):
      logits, cache = nnx.merge(graphdef, state).prefill(tokens_1S, cache, length_1, slots=slot_1,
                                                         max_context=max_context)
      return logits[0, length_1[0] - 1], cache

    @step(4)
    def decode(state, cache, tokens_B1, active_B, max_context):
      logits, cache = nnx.merge(graphdef, state).decode(tokens_B1, cache, active=active_B, max_context=max_context)
      return logits[:, 0], cache

    @step(5)
    def extend(state, cache, tokens_NS, counts_N, slots_N, max_context):
      logits, cache = nnx.merge(graphdef, state).prefill(tokens_NS, cache, counts_N, slots=slots_N,
                                                         max_context=max_context)
      return logits[jnp.arange(tokens_NS.shape[0]), counts_N - 1], cache

    @step(9, statics=2, outs=2)
    def decode_sample(state, cache, next_B, active_B, seeds, positions, temperature, top_k, top_p, max_context,
                      greedy_only):
      logits, cache = nnx.merge(graphdef, state).decode(next_B[:, None], cache, active=active_B,
                                                        max_context=max_context)
      drawn_B = pick_tokens(logits[:, 0], seeds, positions, temperature, top_k, top_p, greedy_only=greedy_only)
      return jnp.where(active_B, drawn_B, next_B), cache.overflow, cache

    @step(11, statics=2, outs=2)
    def prefill_sample(state, cache, next_B, tokens_1S, length_1, slot_1, seeds, positions, temperature, top_k,
                       top_p, max_context, greedy_only):
      logits, cache = nnx.merge(graphdef, state).prefill(tokens_1S, cache, length_1, slots=slot_1,
                                                         max_context=max_context)
      drawn = pick_tokens(logits[:, length_1[0] - 1], seeds, positions, temperature, top_k, top_p,
                          greedy_only=greedy_only)
      return next_B.at[slot_1[0]].set(drawn[0]), cache.overflow, cache

    self._prefill, self._decode, self._extend = prefill, decode, extend
    self._decode_sample, self._prefill_sample = decode_sample, prefill_sample
    self._next = jnp.zeros(num_slots, jnp.int32)  # each slot's next input token (dispatch-ahead steps)

  def prefill(self, slot, prompt_ids):
    tokens, n = padded_prompt(self._lengths, slot, prompt_ids, self.max_len, self.bucket)
    logits, self.cache = self._prefill(self._state, self.cache, jnp.asarray(tokens), jnp.asarray([n], jnp.int32),
                                       jnp.asarray([slot], jnp.int32), self._context_bucket(n))
    self._lengths[slot] = n
    self._check()
    return logits

  def decode(self, slots, tokens):
    active, max_context = self._decode_rows(slots)
    batch = np.zeros((self.num_slots, 1), np.int32)
    for slot, tok in zip(slots, tokens, strict=True):
      batch[slot, 0] = tok
    logits, self.cache = self._decode(self._state, self.cache, jnp.asarray(batch), jnp.asarray(active), max_context)
    for slot in slots:
      self._lengths[slot] += 1
    self._check()
    return logits[jnp.asarray(list(slots))]

  def decode_sample(self, slots, rows: SamplingRows) -> DrawnTokens:
    """Feeds each slot in `slots` its next token (the one its last prefill_sample / decode_sample drew) and draws
    the following one with rows' parameters (SamplingRows of num_slots rows); nothing waits for the device."""
    if len(rows.seeds) != self.num_slots:
      raise ValueError(f"sampling rows: need {self.num_slots} (one per slot), got {len(rows.seeds)}")
    active, max_context = self._decode_rows(slots)
    self._next, overflow, self.cache = self._decode_sample(
        self._state, self.cache, self._next, jnp.asarray(active), *rows.arrays, max_context, rows.greedy_only)
    for slot in slots:
      self._lengths[slot] += 1
    return DrawnTokens(self._next, overflow)

  def prefill_sample(self, slot, prompt_ids, rows: SamplingRows) -> DrawnTokens:
    """Prefills free slot `slot` with the prompt and draws its first token (rows: SamplingRows of one row) on the
    device, as the slot's next input; nothing waits for the device."""
    tokens, n = padded_prompt(self._lengths, slot, prompt_ids, self.max_len, self.bucket)
    if len(rows.seeds) != 1:
      raise ValueError(f"sampling rows: need 1 for a prefill, got {len(rows.seeds)}")
    self._next, overflow, self.cache = self._prefill_sample(
        self._state, self.cache, self._next, jnp.asarray(tokens), jnp.asarray([n], jnp.int32),
        jnp.asarray([slot], jnp.int32), *rows.arrays, self._context_bucket(n), rows.greedy_only)
    self._lengths[slot] = n
    return DrawnTokens(self._next, overflow)

  def fork(self, src, dst):
    """Slot `dst` (free) continues slot `src`'s sequence, sharing its finished cache pages (serve.cache.fork_slot)."""
    from dsv4_jax.serve.cache import fork_slot
    if self._lengths[src] is None or self._lengths[dst] is not None or src == dst:
      raise RuntimeError(f"fork: slot {src} must hold a sequence and slot {dst} must be free")
    self.cache = self._place(fork_slot(self.cache, src, dst))
    self._lengths[dst] = self._lengths[src]
    self._check()

  def extend(self, slots, token_lists):
    """Appends token_lists[i] to slot slots[i] (one batched cached step); logits after each row's last token."""
    tokens, n = padded_extension(self._lengths, slots, token_lists, self.max_len, self.bucket)
    longest = max(self._lengths[slot] + k for slot, k in zip(slots, n))
    logits, self.cache = self._extend(self._state, self.cache, jnp.asarray(tokens), jnp.asarray(n, jnp.int32),
                                      jnp.asarray(list(slots), jnp.int32), self._context_bucket(longest))
    for slot, k in zip(slots, n):
      self._lengths[slot] += k
    self._check()
    return logits

  def release(self, slot):
    if self._release is None:
      raise NotImplementedError("the KV cache has no per-slot release operation yet (cached_backend.release_op)")
    self.cache = self._place(self._release(self.cache, slot))
    self._lengths[slot] = None

  def _decode_rows(self, slots) -> tuple[np.ndarray, int]:
    """(active [num_slots] bool, max_context) for a decode step of `slots`; clear errors for an empty or full slot."""
    active = np.zeros(self.num_slots, bool)
    for slot in slots:
      if self._lengths[slot] is None:
        raise RuntimeError(f"slot {slot} holds no sequence")
      if self._lengths[slot] >= self.max_len:
        raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
      active[slot] = True
    longest = max([n + 1 if active[s] else n for s, n in enumerate(self._lengths) if n is not None])
    return active, self._context_bucket(longest)

  def _context_bucket(self, longest: int) -> int:
    """max_context for a step whose longest row (of the rows it touches) ends at `longest` tokens."""
    return min(self.max_len, max(MIN_CONTEXT_BUCKET, 1 << (max(longest, 1) - 1).bit_length()))

  def _place(self, cache):
    """The cache on its mesh shardings (a no-op without a mesh, or for arrays already placed so): the slot
    operations (release, fork) are jitted without pinned shardings, the steps with."""
    if self._mesh is None:
      return cache
    from dsv4_jax.model.cache import shard_cache
    return shard_cache(cache, self._mesh)

  def _check(self):
    if bool(self.cache.overflow):
      raise RuntimeError(OVERFLOW_MESSAGE)
