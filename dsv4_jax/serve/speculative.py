"""MTP speculative decoding (spec §11): the MTP block drafts the next token, the main model verifies it.

The MTP block at position t reads the main model's last-layer streams h_t and the embedding of token t+1, and
predicts token t+2. A step for a sequence of L cached tokens whose last sampled token x_L is not yet fed:

  1. the MTP block runs (with its own KV cache) over its pending inputs, (h_{L-1}, x_L) after a rejection or
     prefill, (h_{L-2}, x_{L-1}), (h_{L-1}, x_L) after an acceptance; its argmax at the last one is the draft d;
  2. the main model runs [x_L, d] as one two-token cached step (`cached_forward(candidates=True)`), giving the
     logits at L and at L+1 (the latter conditioned on x_{L+1} = d);
  3. x_{L+1} is sampled from the logits at L exactly as plain decoding would (same sampler, same per-token key);
     the draft is accepted iff x_{L+1} == d, and then x_{L+2} is sampled from the logits at L+1 (key of the next
     token), a free extra token;
  4. the main cache keeps [x_L] or [x_L, d] (`commit`: lengths, window rings and compressor tails equal those of
     plain steps over the kept tokens); the MTP inputs at the kept positions become pending.

Sampling x_{L+1} from the main model and accepting iff it equals the draft is the rejection-sampling rule for a
deterministic (greedy) drafter: accepted with probability p(d), and on rejection the token is p conditioned on
not d. Each emitted token is drawn from the same logits with the same key as plain decoding, so the output is the
same as plain decoding token for token, greedy or sampled (up to float rounding between the one- and two-token
steps). One draft token per step: V4's MTP has depth 1, and a second draft would need the main model's streams
at the drafted position, which only verification produces.

  backend = SpeculativeBackend(model, num_slots=4, max_len=2048)
  engine = Engine(backend, tokenizer)       # the engine calls backend.speculate for its running requests
  backend.stats.acceptance_rate
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.model.cache import InferenceCache, init_mtp_cache
from dsv4_jax.model.decode import cached_forward, commit, mtp_forward
from dsv4_jax.serve.cached_backend import padded_extension, padded_prompt
from dsv4_jax.serve.sampling import sample_rows

DRAFT_TOKENS = 1  # tokens the MTP block proposes per step (depth-1 MTP)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftState:
  """The MTP side of each slot: its cache and the inputs it has not consumed yet (their count = main length -
  MTP length; 1 after a prefill or a rejection, 2 after an acceptance)."""
  cache: InferenceCache  # the MTP block's own cache (init_mtp_cache)
  h: jax.Array  # [B, 2, hc, d] main streams at the pending positions
  tokens: jax.Array  # [B, 2] the token after each; the last pending one is the slot's last sampled token
  count: jax.Array  # [B] int32 pending inputs


def init_draft_state(model, batch: int, max_len: int, *, kv_format: str = "float32",
                     page_tokens: int | None = None) -> DraftState:
  cfg = model.cfg
  return DraftState(
      cache=init_mtp_cache(cfg, batch, max_len, kv_format=kv_format, page_tokens=page_tokens),
      h=jnp.zeros((batch, 1 + DRAFT_TOKENS, cfg.hc_mult, cfg.hidden_size), jnp.dtype(cfg.dtype)),
      tokens=jnp.zeros((batch, 1 + DRAFT_TOKENS), jnp.int32), count=jnp.zeros((batch,), jnp.int32))


def prefill(model, tokens, cache: InferenceCache, draft: DraftState, lengths=None, slots=None):
  """(logits [B, S, V], cache, draft): the main model's prefill plus the MTP block's inputs of the chunk.

  Rows as in DeepSeekV4.prefill (lengths: valid tokens, 0 = untouched; slots: their cache slots). Chunks of a
  long prompt may come in several calls: the input left pending by the previous chunk is consumed first.
  """
  tokens_BS = jnp.asarray(tokens, jnp.int32)
  B, S = tokens_BS.shape
  n_B = jnp.full((B,), S, jnp.int32) if lengths is None else jnp.clip(jnp.asarray(lengths, jnp.int32), 0, S)
  if slots is not None:
    slots = jnp.asarray(slots, jnp.int32)
  take = (lambda a: a) if slots is None else (lambda a: a[slots])
  logits, h, cache = cached_forward(model, tokens_BS, cache, n_B, slots)
  # MTP input pairs (streams at p, token at p+1): the pending one (the previous chunk's last streams, paired
  # with this chunk's first token), then (h[s], tokens[s+1]) inside the chunk; the chunk's last stays pending.
  pend_B = (take(draft.count) > 0) & (n_B > 0)
  h_ext = jnp.concatenate([take(draft.h)[:, :1], h.astype(draft.h.dtype)], axis=1)  # pair j: streams h_ext[j]
  tok_ext = jnp.concatenate([tokens_BS, jnp.zeros((B, 1), jnp.int32)], axis=1)  # and token tokens[j]
  j_BS = jnp.arange(S, dtype=jnp.int32)[None, :] + (1 - pend_B.astype(jnp.int32))[:, None]
  h_in = jnp.take_along_axis(h_ext, j_BS[:, :, None, None], axis=1)
  tok_in = jnp.take_along_axis(tok_ext, j_BS, axis=1)
  mtp_counts = jnp.where(n_B > 0, n_B - 1 + pend_B.astype(jnp.int32), 0)
  _, mtp_cache = mtp_forward(model, h_in, tok_in, draft.cache, mtp_counts, slots)
  last_h = h[jnp.arange(B), jnp.maximum(n_B - 1, 0)].astype(draft.h.dtype)
  new_h = jnp.where((n_B > 0)[:, None, None, None], take(draft.h).at[:, 0].set(last_h), take(draft.h))
  new_count = jnp.where(n_B > 0, 1, take(draft.count))
  put = (lambda old, v: v) if slots is None else (lambda old, v: old.at[slots].set(v))
  draft = DraftState(cache=mtp_cache, h=put(draft.h, new_h), tokens=draft.tokens,
                     count=put(draft.count, new_count))
  return logits, cache, draft


def step(model, cache: InferenceCache, draft: DraftState, last_B, active_B, allow_B, seeds_B, positions_B,
         temperature_B, top_k_B, top_p_B, forced_draft_B=None):
  """One speculative step over all slots (see the module docstring).

  last_B: each slot's last sampled token (not yet in the cache); active_B: slots that step; allow_B: slots that
  may draft (room for two more tokens, and wanting them); sampling arguments as `sample_rows`, positions_B =
  the index of the token about to be generated. forced_draft_B: use these drafts instead of the MTP block's
  (tests; the MTP block still consumes its inputs).
  Returns (tokens [B, 2], kept [B] (tokens of `tokens` emitted: 1 or 2; 0 for inactive slots), drafted [B] bool,
  accepted [B] bool, logits at L [B, V], cache, draft).
  """
  B = last_B.shape[0]
  rows = jnp.arange(B)
  active_B = jnp.asarray(active_B, bool)
  last_B = jnp.asarray(last_B, jnp.int32)
  # 1. draft
  has_B = active_B & (draft.count > 0)
  at_B = jnp.maximum(draft.count - 1, 0)
  tokens_in = draft.tokens.at[rows, at_B].set(jnp.where(has_B, last_B, draft.tokens[rows, at_B]))
  mtp_logits, mtp_cache = mtp_forward(model, draft.h, tokens_in, draft.cache, jnp.where(has_B, draft.count, 0))
  d_B = jnp.argmax(mtp_logits[rows, at_B], axis=-1).astype(jnp.int32)
  if forced_draft_B is not None:
    d_B = jnp.asarray(forced_draft_B, jnp.int32)
  drafted_B = has_B & jnp.asarray(allow_B, bool)
  # 2. verify [last, draft]
  chunk_B2 = jnp.stack([last_B, d_B], axis=1)
  counts_B = jnp.where(active_B, 1 + drafted_B.astype(jnp.int32), 0)
  logits, h, cache, pending = cached_forward(model, chunk_B2, cache, counts_B, candidates=True)
  # 3. sample as plain decoding would, accept iff the draft is what was drawn
  draw = lambda lg, pos: sample_rows(lg, seeds_B, pos, temperature_B, top_k_B, top_p_B)
  positions_B = jnp.asarray(positions_B, jnp.int32)
  t_B2 = jnp.stack([draw(logits[:, 0], positions_B), draw(logits[:, 1], positions_B + 1)], axis=1)
  accepted_B = drafted_B & (t_B2[:, 0] == d_B)
  kept_B = jnp.where(active_B, 1 + accepted_B.astype(jnp.int32), 0)
  # 4. commit the kept tokens; their MTP inputs become pending
  cache = commit(cache, pending, kept_B)
  upd = active_B[:, None]
  draft = DraftState(
      cache=mtp_cache, h=jnp.where(upd[:, :, None, None], h.astype(draft.h.dtype), draft.h),
      tokens=jnp.where(upd, t_B2, tokens_in), count=jnp.where(active_B, kept_B, draft.count))
  return t_B2, kept_B, drafted_B, accepted_B, logits[:, 0], cache, draft


@dataclasses.dataclass
class SpecStats:
  steps: int = 0  # speculative steps run (one per engine step with running requests)
  slot_steps: int = 0  # sequences stepped, summed over steps
  drafted: int = 0  # draft tokens proposed
  accepted: int = 0  # draft tokens accepted
  emitted: int = 0  # tokens produced by the steps (accepted drafts' bonus tokens included)

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / self.drafted if self.drafted else 0.0

  @property
  def tokens_per_step(self) -> float:
    """Tokens per sequence per step (1 for plain decoding)."""
    return self.emitted / self.slot_steps if self.slot_steps else 0.0

  def summary(self) -> str:
    return (f"speculative (MTP): {self.accepted}/{self.drafted} drafts accepted "
            f"({100 * self.acceptance_rate:.1f}%), {self.tokens_per_step:.2f} tokens per sequence step")


class SpeculativeBackend:
  """An engine backend (backend.py) over the KV cache that decodes with MTP speculation.

  Besides prefill / decode / fork / extend / release (the CachedBackend contract; fork and extend serve Quick
  Instruction) it offers `speculate(slots, tokens, params, positions, budgets)`, which the
  engine calls instead of decode + sampling: up to two tokens per slot per step. `decode` (plain, logits) also
  works and keeps the MTP side in step. Prompts are right-padded to a multiple of `bucket`; steps run the whole
  batch with free slots inactive (one compile each).
  """

  speculative = True

  def __init__(self, model, num_slots: int, max_len: int | None = None, *, kv_format: str | None = None,
               bucket: int = 64, release=None):
    if not len(getattr(model, "mtp", ())):
      raise ValueError("speculative decoding needs a model with an MTP block (num_nextn_predict_layers >= 1)")
    from dsv4_jax.serve.backend import serving_model
    from dsv4_jax.serve.cached_backend import release_op
    model = serving_model(model)  # exact MoE (moe_impl "exact"): no capacity drops that differ by chunk width
    limit = model.cfg.max_position_embeddings
    max_len = limit if max_len is None else max_len
    if num_slots < 1 or not 1 < max_len <= limit:
      raise ValueError(f"need num_slots >= 1 and max_len in [2, {limit}], got {num_slots}, {max_len}")
    self.num_slots, self.max_len, self.vocab_size, self.bucket = num_slots, max_len, model.cfg.vocab_size, bucket
    self._release = release or release_op()
    if self._release is None:
      raise NotImplementedError("the KV cache has no per-slot release operation (cached_backend.release_op)")
    self.cache = model.init_cache(num_slots, max_len, **({} if kv_format is None else {"kv_format": kv_format}))
    self.draft = init_draft_state(model, num_slots, max_len, kv_format=self.cache.kv_format)
    self._lengths: list[int | None] = [None] * num_slots
    self.stats = SpecStats()
    graphdef, self._state = nnx.split(model)
    self._prefill, self._extend, self._step = _jitted(graphdef)
    self.forced_draft = None  # tests: a function (slots) -> draft tokens, replacing the MTP block's

  def prefill(self, slot, prompt_ids):
    tokens, n = padded_prompt(self._lengths, slot, prompt_ids, self.max_len, self.bucket)
    logits, self.cache, self.draft = self._prefill(self._state, self.cache, self.draft, jnp.asarray(tokens),
                                                   jnp.asarray([n], jnp.int32), jnp.asarray([slot], jnp.int32))
    self._lengths[slot] = n
    self._check()
    return logits

  def _run(self, slots, tokens, params=None, positions=None, budgets=None):
    B = self.num_slots
    arr = lambda dtype: np.zeros(B, dtype)
    last, active, allow = arr(np.int32), arr(bool), arr(bool)
    seeds, pos, temp, top_k, top_p = arr(np.uint32), arr(np.int32), arr(np.float32), arr(np.int32), np.ones(B, np.float32)
    for i, (slot, tok) in enumerate(zip(slots, tokens, strict=True)):
      if self._lengths[slot] is None:
        raise RuntimeError(f"slot {slot} holds no sequence")
      if self._lengths[slot] >= self.max_len:
        raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
      last[slot], active[slot] = tok, True
      if params is not None:
        p = params[i]
        seeds[slot], pos[slot], temp[slot], top_k[slot], top_p[slot] = (p.seed % 2**32, positions[i], p.temperature,
                                                                        p.top_k, p.top_p)
        allow[slot] = budgets[i] >= 2 and self._lengths[slot] + 2 <= self.max_len
    forced = None if self.forced_draft is None else jnp.asarray(self.forced_draft(self), jnp.int32)
    out = self._step(self._state, self.cache, self.draft, jnp.asarray(last), jnp.asarray(active),
                     jnp.asarray(allow), seeds, pos, temp, top_k, top_p, forced)
    t, kept, drafted, accepted, logits, self.cache, self.draft = out
    kept = np.asarray(kept)
    for slot in slots:
      self._lengths[slot] += int(kept[slot])
    self._check()
    return np.asarray(t), kept, np.asarray(drafted), np.asarray(accepted), logits

  def decode(self, slots, tokens):
    """Plain decode (no draft): logits [len(slots), V] of the next token, as CachedBackend.decode."""
    *_, logits = self._run(slots, tokens)
    return logits[jnp.asarray(list(slots))]

  def speculate(self, slots, tokens, params, positions, budgets):
    """One speculative step: feeds each slot its last token, drafts, verifies, samples.

    params: each slot's SamplingParams (with seed); positions: index of the token each will generate next;
    budgets: tokens each still wants (no draft below 2). Returns (tokens [N, 2], kept [N]): row i's first
    kept[i] tokens are its output, in order.
    """
    t, kept, drafted, accepted, _ = self._run(slots, tokens, params, positions, budgets)
    idx = np.asarray(list(slots))
    self.stats.steps += 1
    self.stats.slot_steps += len(idx)
    self.stats.drafted += int(drafted[idx].sum())
    self.stats.accepted += int(accepted[idx].sum())
    self.stats.emitted += int(kept[idx].sum())
    return t[idx], kept[idx]

  def fork(self, src, dst):
    """Slot `dst` (free) continues slot `src`'s sequence (Quick Instruction): the main and the MTP caches fork
    copy-on-write (serve.cache.fork_slot: state rows copied, full pages shared, the last page copied) and the
    slot's pending MTP inputs (streams, tokens, count) are copied, so `dst` drafts as `src` would."""
    from dsv4_jax.serve.cache import fork_slot
    if self._lengths[src] is None or self._lengths[dst] is not None or src == dst:
      raise RuntimeError(f"fork: slot {src} must hold a sequence and slot {dst} must be free")
    self.cache = fork_slot(self.cache, src, dst)
    d = self.draft
    copy = lambda a: a.at[dst].set(a[src])
    self.draft = DraftState(cache=fork_slot(d.cache, src, dst), h=copy(d.h), tokens=copy(d.tokens),
                            count=copy(d.count))
    self._lengths[dst] = self._lengths[src]
    self._check()

  def extend(self, slots, token_lists):
    """Appends token_lists[i] to slot slots[i] (one batched cached step, the MTP block's inputs too); logits
    [len(slots), V] after each row's last token. As CachedBackend.extend; no draft."""
    tokens, n = padded_extension(self._lengths, slots, token_lists, self.max_len, self.bucket)
    logits, self.cache, self.draft = self._extend(self._state, self.cache, self.draft, jnp.asarray(tokens),
                                                  jnp.asarray(n, jnp.int32), jnp.asarray(list(slots), jnp.int32))
    for slot, k in zip(slots, n):
      self._lengths[slot] += k
    self._check()
    return logits

  def release(self, slot):
    self.cache = self._release(self.cache, slot)
    d = self.draft
    self.draft = dataclasses.replace(d, cache=self._release(d.cache, slot), count=d.count.at[slot].set(0))
    self._lengths[slot] = None

  def _check(self):
    if bool(self.cache.overflow) or bool(self.draft.cache.overflow):
      raise RuntimeError("the KV cache overflowed (out of pages or past max_len); its last writes were dropped")


@functools.lru_cache(maxsize=8)
def _jitted(graphdef):
  """Jitted prefill, extend (rows into given slots) and step for one model structure (caches donated)."""

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def prefill_fn(state, cache, draft, tokens_1S, length_1, slot_1):
    logits, cache, draft = prefill(nnx.merge(graphdef, state), tokens_1S, cache, draft, length_1, slot_1)
    return logits[0, length_1[0] - 1], cache, draft

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def extend_fn(state, cache, draft, tokens_NS, counts_N, slots_N):
    logits, cache, draft = prefill(nnx.merge(graphdef, state), tokens_NS, cache, draft, counts_N, slots_N)
    return logits[jnp.arange(tokens_NS.shape[0]), counts_N - 1], cache, draft

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def step_fn(state, cache, draft, *args):
    return step(nnx.merge(graphdef, state), cache, draft, *args)

  return prefill_fn, extend_fn, step_fn
