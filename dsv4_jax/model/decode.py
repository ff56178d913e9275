"""Cached forward (spec §7 "decode indexing", §8): a chunk of new tokens per sequence against an InferenceCache.

One function serves prefill (a prompt or a chunk of one), decode (one token) and speculative verification
(a few tokens): row b's tokens s < count_B[b] sit at positions lengths[b] + s. Per layer, the keys are
[window ring (old tokens) | the chunk's own raw entries | compressed entries read back from the pages], and
each query's indices pick the same entries as the full forward (window of the last `sliding_window` tokens,
CSA top-k / every visible HCA entry below floor((t+1)/m)); entries finished inside the chunk are written to
the pages first, so later queries of the chunk see them. Layer stacks are scanned with their caches in the
carry (written in place at the layer index).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels

from dsv4_jax.model import kv_format as kvf
from dsv4_jax.model import rope
from jax.sharding import PartitionSpec as P

from dsv4_jax.model.cache import (CompressorState, InferenceCache, LayerPool, LayerState, allocate_pages,
                                  local_page_axes, scatter_rows, select_rows)
from dsv4_jax.model.indexer import select_topk_with_scores
from pallas_kernels._query_chunks import merge_queries, split_queries
from pallas_kernels.indexer_topk.reference import default_query_chunk, top_visible
from dsv4_jax.model.options import INFERENCE


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What every layer of one cached step shares (closed over by the layer scans)."""
  tokens_BS: jax.Array
  positions_BS: jax.Array
  start_B: jax.Array  # tokens cached before this chunk
  count_B: jax.Array  # valid tokens of the chunk
  page_table_BP: jax.Array
  rope_plain: tuple
  rope_yarn: tuple
  window_BSW: jax.Array  # indices into [ring | chunk]
  ring_src_BW: jax.Array  # chunk row that lands in each ring slot, where ring_new_BW
  ring_new_BW: jax.Array
  kv_format: str
  page_tokens: int
  candidates: bool = False  # speculative verification: layers return the state after every chunk prefix
  page_axes: tuple = ()  # mesh axes splitting rows and pages into page shards: page reads per shard (else global)
  opts = INFERENCE


@dataclasses.dataclass(frozen=True)
class _CachedBlocks:
  """Block visibility for the indexer's top-k over cached entries: entry i is visible to the query at
  position t iff i < floor((t+1)/m) (passed positions where the forward passes document ids)."""
  ratio: int
  n: int

  def visible_BCN(self, t_C, positions_BC):
    del t_C
    return jnp.arange(self.n, dtype=jnp.int32)[None, None, :] < ((positions_BC + 1) // self.ratio)[:, :, None]


def make_step_context(cfg, tokens_BS, start_B, count_B, page_table_BP, ring: int, kv_format: str,
                      page_tokens: int, candidates: bool = False, page_axes: tuple = ()) -> StepContext:
  S = tokens_BS.shape[1]
  W = cfg.sliding_window
  positions_BS = start_B[:, None] + jnp.arange(S, dtype=jnp.int32)
  j_BSW = positions_BS[:, :, None] - W + 1 + jnp.arange(W, dtype=jnp.int32)
  start_B11 = start_B[:, None, None]
  window_BSW = jnp.where(j_BSW < 0, -1, jnp.where(j_BSW < start_B11, j_BSW % W, ring + j_BSW - start_B11))
  ring_src_BW, ring_new_BW = _ring_landing(start_B, count_B, ring, W)
  return StepContext(
      tokens_BS=tokens_BS, positions_BS=positions_BS, start_B=start_B, count_B=count_B,
      page_table_BP=page_table_BP,
      rope_plain=rope.rope_table(positions_BS, rope.layer_frequencies(cfg, compressed=False)),
      rope_yarn=rope.rope_table(positions_BS, rope.layer_frequencies(cfg, compressed=True)),
      window_BSW=window_BSW.astype(jnp.int32), ring_src_BW=ring_src_BW, ring_new_BW=ring_new_BW,
      kv_format=kv_format, page_tokens=page_tokens, candidates=candidates, page_axes=page_axes)


def _ring_landing(start_B, count_B, ring: int, W: int):
  """(chunk row landing in each ring slot [B, Wr], whether one does) after count_B tokens from start_B."""
  last_B1 = (start_B + count_B - 1)[:, None]
  slot_W = jnp.arange(ring, dtype=jnp.int32)
  newest_BW = last_B1 - (last_B1 - slot_W[None, :]) % W  # latest position held by each ring slot
  return jnp.maximum(newest_BW - start_B[:, None], 0), newest_BW >= start_B[:, None]


# ----- pages ---------------------------------------------------------------------------------------------
# Page ids are global. With sc.page_axes (rows = all slots, each device holding its rows' page shard: see
# dsv4_jax.model.cache) the reads and writes run in jax.shard_map, each device on its rows and its pages with
# local ids (page % pages per shard); GSPMD would instead gather on every device and sum the partial rows.
def _locate(table_BP, entry_BX, per_page: int):
  """(page id, row in page) of entry indices [B, ...] of each row's sequence (page -1 where none)."""
  P_ = table_BP.shape[1]
  flat = entry_BX.reshape(entry_BX.shape[0], -1)
  page = jnp.take_along_axis(table_BP, jnp.clip(flat // per_page, 0, P_ - 1), axis=1)
  page = jnp.where(flat // per_page < P_, page, -1)
  return page.reshape(entry_BX.shape), entry_BX % per_page


def _paged(sc: StepContext, fn, pool_R, r, rows, out_pool: bool):
  """fn(pool_R, r, page_table_BP, *rows) (rows: arrays with the batch first), on each device's rows and pages
  with the table's ids made local (-1 stays -1) when sc.page_axes is set, else as is (GSPMD)."""
  if not sc.page_axes:
    return fn(pool_R, r, sc.page_table_BP, *rows)
  mesh = jax.sharding.get_abstract_mesh()
  n = pool_R.shape[1] // math.prod(mesh.shape[a] for a in sc.page_axes)  # pages per shard

  def local(pool_R, r, table_BP, *rows):  # a slot's pages lie in its shard's range (model.cache)
    return fn(pool_R, r, jnp.where(table_BP >= 0, table_BP % n, -1), *rows)

  manual = set(getattr(mesh, "manual_axes", ()))
  pool, batch = P(None, sc.page_axes), P(sc.page_axes)
  return jax.shard_map(local, in_specs=(pool, P(), batch) + (batch,) * len(rows),
                       out_specs=pool if out_pool else batch,
                       axis_names=frozenset(a for a in mesh.axis_names if a not in manual),
                       check_vma=False)(pool_R, r, sc.page_table_BP, *rows)


def write_entries(pool_R, r, sc: StepContext, rows_BNE, entry_BN, valid_BN):
  """pool[r] at the pages of entries `entry_BN` <- rows (invalid ones and missing pages dropped)."""

  def write(pool_R, r, table_BP, rows_BNE, entry_BN, valid_BN):
    page_BN, off_BN = _locate(table_BP, entry_BN, pool_R.shape[2])
    page_BN = jnp.where(valid_BN & (page_BN >= 0), page_BN, pool_R.shape[1])
    return pool_R.at[r, page_BN, off_BN].set(rows_BNE.astype(pool_R.dtype), mode="drop")

  return _paged(sc, write, pool_R, r, (rows_BNE, entry_BN, valid_BN), out_pool=True)


def read_all(pool_R, r, sc: StepContext):
  """Every entry slot of each row's pages (the step's span), in entry order: [B, pages · per_page, E]."""

  def read(pool_R, r, table_BP):
    rows = pool_R[r, jnp.maximum(table_BP, 0)]
    return rows.reshape(rows.shape[0], -1, rows.shape[-1])

  return _paged(sc, read, pool_R, r, (), out_pool=False)


def read_index_scores(keys_R, r, sc: StepContext, q_BSHC, w_BSH, impl: str):
  """Index scores [B, S, pages · per_page] of every packed (fp8 format) indexer key in each row's pages."""

  def scores(keys_R, r, table_BP, q_BSHC, w_BSH):
    R, n_pages = keys_R.shape[:2]
    table_BP = jnp.where(table_BP >= 0, table_BP + r * n_pages, -1)  # pages of all repeats as one pool
    return pallas_kernels.paged_index_scores(q_BSHC, w_BSH, keys_R.reshape(R * n_pages, *keys_R.shape[2:]),
                                             table_BP, implementation=impl)

  return _paged(sc, scores, keys_R, r, (q_BSHC, w_BSH), out_pool=False)


def read_entries(pool_R, r, sc: StepContext, entry_BX):

  def read(pool_R, r, table_BP, entry_BX):
    page, off = _locate(table_BP, jnp.maximum(entry_BX, 0), pool_R.shape[2])
    return pool_R[r, jnp.maximum(page, 0), off]

  return _paged(sc, read, pool_R, r, (entry_BX,), out_pool=False)


# ----- one layer -----------------------------------------------------------------------------------------
def attention_step(attn, x_BSD, sc: StepContext, state: LayerState, pool: LayerPool, r):
  """Cached Attention.__call__: (out [B, S, D], new LayerState of this layer, new LayerPool)."""
  cfg, fmt, dt = attn.cfg, sc.kv_format, x_BSD.dtype
  B, S = x_BSD.shape[:2]
  c, rd = cfg.head_dim, cfg.qk_rope_head_dim
  unpack = lambda rows: kvf.unpack_entries(rows, c, rd, fmt, dt)
  table = sc.rope_yarn if attn.ratio else sc.rope_plain
  qr_BSQ, q_BSHC = attn.queries(x_BSD, table)
  kv_BSC = attn.window_kv(x_BSD, table)

  ring_BWE = state.window
  chunk_BSE = kvf.pack_entries(kv_BSC, rd, fmt)
  landed = jnp.take_along_axis(chunk_BSE, sc.ring_src_BW[:, :, None], axis=1)
  new_state = dataclasses.replace(state, window=jnp.where(sc.ring_new_BW[:, :, None], landed, ring_BWE))
  keys = [unpack(ring_BWE), kv_BSC]
  indices = [sc.window_BSW]
  offset = ring_BWE.shape[1] + S

  if attn.ratio:
    m = attn.ratio
    comp = state.compressor
    entries_BNC, block_BN, valid_BN, kv_st, score_st = attn.compressor.extend(
        x_BSD, comp.kv, comp.score, sc.start_B, sc.count_B)
    new_state = dataclasses.replace(new_state, compressor=CompressorState(kv_st, score_st))
    entries_R = write_entries(pool.entries, r, sc, kvf.pack_entries(entries_BNC, rd, fmt), block_BN, valid_BN)
    pool = dataclasses.replace(pool, entries=entries_R)
    n_all = entries_R.shape[2] * sc.page_table_BP.shape[1]
    if attn.indexer is None:  # HCA: every visible entry
      i_N = jnp.arange(n_all, dtype=jnp.int32)
      visible = _CachedBlocks(m, n_all).visible_BCN(None, sc.positions_BS)
      keys.append(unpack(read_all(entries_R, r, sc)))
      indices.append(jnp.where(visible, offset + i_N, -1))
    else:
      picks_BSK, new_state, pool = _index_step(attn.indexer, x_BSD, qr_BSQ, sc, new_state, pool, r, n_all)
      K = picks_BSK.shape[-1]
      if S * K < n_all:  # few queries (decode): gather just the picked entries, per query
        keys.append(unpack(read_entries(entries_R, r, sc, picks_BSK)).reshape(B, S * K, c))
        own_BSK = offset + (jnp.arange(S, dtype=jnp.int32)[:, None] * K + jnp.arange(K, dtype=jnp.int32))
        indices.append(jnp.where(picks_BSK >= 0, own_BSK[None], -1))
      else:
        keys.append(unpack(read_all(entries_R, r, sc)))
        indices.append(jnp.where(picks_BSK >= 0, offset + picks_BSK, -1))

  if sc.candidates:
    new_state = _prefix_states(attn, x_BSD, sc, state, chunk_BSE)
  o_BSHC, _ = attn.attend(q_BSHC, jnp.concatenate(keys, axis=1), jnp.concatenate(indices, axis=-1))
  return attn.output(o_BSHC, table), new_state, pool


def _prefix_states(attn, x_BSD, sc: StepContext, state: LayerState, chunk_BSE) -> LayerState:
  """The layer's state after each prefix of the chunk, c = 1..S tokens (min(c, count) for shorter rows), from
  the state before it: leaves [S, B, ...]. Each is what a step of exactly those tokens leaves (same ring
  landing, same `extend` tail), so a verification step can keep any accepted prefix (see `commit`)."""
  ring = state.window.shape[1]

  def tail(compressor, st, n_B):
    if st is None:
      return None
    _, _, _, kv, score = compressor.extend(x_BSD, st.kv, st.score, sc.start_B, n_B)
    return CompressorState(kv, score)

  out = []
  for c in range(1, x_BSD.shape[1] + 1):
    n_B = jnp.minimum(sc.count_B, c)
    src_BW, new_BW = _ring_landing(sc.start_B, n_B, ring, attn.cfg.sliding_window)
    landed = jnp.take_along_axis(chunk_BSE, src_BW[:, :, None], axis=1)
    out.append(LayerState(
        window=jnp.where(new_BW[:, :, None], landed, state.window),
        compressor=tail(attn.compressor, state.compressor, n_B),
        index_compressor=tail(attn.indexer.compressor if attn.indexer is not None else None,
                              state.index_compressor, n_B)))
  return jax.tree.map(lambda *a: jnp.stack(a), *out)


def _index_step(indexer, x_BSD, qr_BSQ, sc, state: LayerState, pool: LayerPool, r, n_all: int):
  """Indexer keys of the chunk into the pages, then the top-k visible cached entries per query [B, S, k]."""
  cfg, fmt = indexer.cfg, sc.kv_format
  comp = state.index_compressor
  keys_BNC, block_BN, valid_BN, kv_st, score_st = indexer.compressor.extend(
      x_BSD, comp.kv, comp.score, sc.start_B, sc.count_B)
  state = dataclasses.replace(state, index_compressor=CompressorState(kv_st, score_st))
  keys_R = write_entries(pool.index_keys, r, sc, kvf.pack_keys(keys_BNC, fmt), block_BN, valid_BN)
  pool = dataclasses.replace(pool, index_keys=keys_R)
  q_BSHC = indexer.queries(qr_BSQ, sc)
  w_BSH = indexer.head_weights(x_BSD)
  k = min(cfg.index_topk, n_all)
  if fmt == "fp8":  # score the packed keys where they lie (pallas_kernels.paged_index_scores)
    return _packed_topk(keys_R, r, sc, q_BSHC, w_BSH, n_all, k, _paged_scores_impl(cfg, sc)), state, pool
  k_BNC = kvf.unpack_keys(read_all(keys_R, r, sc), cfg.index_head_dim, fmt, x_BSD.dtype)
  picks_BSK, _ = select_topk_with_scores(q_BSHC, k_BNC, w_BSH, _CachedBlocks(4, n_all), sc.positions_BS, k,
                                         offset=0)
  return picks_BSK, state, pool


def _packed_topk(keys_R, r, sc: StepContext, q_BSHC, w_BSH, n_all: int, k: int, impl: str):
  """The top-k visible cached entries per query [B, S, k] by the index scores of the packed keys; queries in
  chunks of the indexer reference's score budget, so a long prefill chunk never holds [B, S, H, N] or
  [B, S, N] whole (a decode step is one chunk)."""
  B, S, H, _ = q_BSHC.shape
  blocks = _CachedBlocks(4, n_all)

  def chunk(q_BCHC, w_BCH, positions_BC):
    scores_BCN = read_index_scores(keys_R, r, sc, q_BCHC, w_BCH, impl)
    return top_visible(scores_BCN, blocks.visible_BCN(None, positions_BC), k)[0]

  size = default_query_chunk(B, S, H, n_all)
  if size >= S:
    return chunk(q_BSHC, w_BSH, sc.positions_BS)
  xs = tuple(split_queries(a, size) for a in (q_BSHC, w_BSH, sc.positions_BS))  # padding queries see nothing
  return merge_queries(jax.lax.map(lambda a: chunk(*a), xs), S)


def _paged_scores_impl(cfg, sc: StepContext) -> str:
  """paged_index_scores' implementation: its GPU kernel ("auto") where the config asks for kernels, unless a
  mesh without page shards is in context (GSPMD cannot split a Mosaic kernel; the reference it can)."""
  if cfg.attention_impl not in ("auto", "gpu"):
    return "reference"
  if not sc.page_axes and not jax.sharding.get_abstract_mesh().empty:
    return "reference"
  return "auto"


def block_step(block, h_BSND, sc: StepContext, state: LayerState, pool: LayerPool, r):
  """Cached Block.__call__ (inference: no aux)."""
  x, post, comb = block.attn_hc.pre(h_BSND)
  y, state, pool = attention_step(block.attn, block.attn_norm(x), sc, state, pool, r)
  h_BSND = block.attn_hc.post(y, h_BSND, post, comb)
  x, post, comb = block.ffn_hc.pre(h_BSND)
  y, _ = block.ffn(block.ffn_norm(x), sc.tokens_BS)
  return block.ffn_hc.post(y, h_BSND, post, comb), state, pool


def stack_step(stack, h, sc: StepContext, states: tuple, pools: tuple):
  """A LayerStack over its stacked caches: lax.scan over repeats, caches in the carry (in-place updates).

  Returns (h, states, pools, prefix_states). With sc.candidates the states stay as they were and
  prefix_states holds, per unit position, the state after each chunk prefix [R, S, B, ...] (else ()).
  """
  graphdef, params = nnx.split(stack.units)

  def body(carry, xs):
    h, states, pools = carry
    unit_params, r = xs
    unit = nnx.merge(graphdef, unit_params)
    states, pools, prefix = list(states), list(pools), []
    for p, block in enumerate(unit.blocks):
      layer_state = jax.tree.map(lambda a: a[r], states[p])
      h, layer_state, pools[p] = block_step(block, h, sc, layer_state, pools[p], r)
      if sc.candidates:
        prefix.append(layer_state)
      else:
        states[p] = jax.tree.map(lambda a, v: a.at[r].set(v), states[p], layer_state)
    return (h, tuple(states), tuple(pools)), tuple(prefix)

  (h, states, pools), prefix = jax.lax.scan(body, (h, states, pools),
                                            (params, jnp.arange(stack.repeats, dtype=jnp.int32)))
  return h, states, pools, prefix


# ----- the model -----------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PendingChunk:
  """A verified-but-uncommitted chunk (cached_forward(..., candidates=True)); `commit` keeps a prefix per row."""
  prefix_states: tuple  # like cache.states, leaves [R, S, B, ...]: the state after 1..S tokens of the chunk
  start_B: jax.Array  # [B] the rows' lengths before the chunk
  count_B: jax.Array  # [B] valid tokens of the chunk
  slots: jax.Array | None  # [B] cache slots of the rows (None: row b is slot b)


def _open_step(cfg, cache: InferenceCache, tokens_BS, counts, slots, max_context, candidates=False):
  """Checks the arguments, grows the rows' page tables: (StepContext, the rows' states, allocation tuple)."""
  if tokens_BS.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq] int32, got shape {tokens_BS.shape}")
  B, S = tokens_BS.shape
  if slots is None and B != cache.batch:
    raise ValueError(f"tokens have {B} rows but the cache has {cache.batch} slots; pass slots=[...] for a subset")
  if slots is not None and jnp.shape(slots) != (B,):
    raise ValueError(f"slots must be [{B}] (one cache slot per token row), got shape {jnp.shape(slots)}")
  count_B = jnp.full((B,), S, jnp.int32) if counts is None else jnp.clip(jnp.asarray(counts, jnp.int32), 0, S)
  if count_B.shape != (B,):
    raise ValueError(f"counts/lengths must be [{B}], got shape {count_B.shape}")

  if slots is None:
    start_B, page_table, states = cache.lengths, cache.page_table, cache.states
  else:
    start_B, page_table, states = cache.lengths[slots], cache.page_table[slots], select_rows(cache.states, slots)
  end_B = start_B + count_B
  page_table, free_pages, num_free, overflow = allocate_pages(cache, page_table, end_B, slots)
  span = cache.max_pages
  if max_context is not None:
    if max_context < 1:
      raise ValueError(f"max_context={max_context} must be >= 1")
    span = min(span, -(-max_context // cache.page_tokens))
    overflow = overflow | jnp.any(end_B > max_context)
  ring = states[0][0].window.shape[2]
  # Rows = all slots on a mesh cutting them into the cache's page shards: page reads per shard (_paged).
  page_axes = local_page_axes(cache, jax.sharding.get_abstract_mesh()) if slots is None else ()
  sc = make_step_context(cfg, tokens_BS, start_B, count_B, page_table[:, :span], ring, cache.kv_format,
                         cache.page_tokens, candidates, page_axes)
  return sc, states, (page_table, free_pages, num_free, overflow)


def _close_step(cache: InferenceCache, sc: StepContext, slots, states, pools, alloc) -> InferenceCache:
  """The cache after a step: pages, page tables and free stack; lengths and states unless sc.candidates."""
  page_table, free_pages, num_free, overflow = alloc
  cache = cache.replace(free_pages=free_pages, num_free=num_free, overflow=cache.overflow | overflow,
                        pools=tuple(pools))
  end_B = sc.start_B + sc.count_B
  if slots is None:
    cache = cache.replace(page_table=page_table)
    return cache if sc.candidates else cache.replace(lengths=end_B, states=tuple(states))
  cache = cache.replace(page_table=cache.page_table.at[slots].set(page_table))
  if sc.candidates:
    return cache
  return cache.replace(lengths=cache.lengths.at[slots].set(end_B),
                       states=scatter_rows(cache.states, tuple(states), slots))


def cached_forward(model, tokens, cache: InferenceCache, counts=None, slots=None, max_context: int | None = None,
                   *, candidates: bool = False):
  """(logits [B, S, V] float32, streams [B, S, hc, d], updated cache) for a chunk of tokens [B, S].

  counts: [B] valid tokens per row (default S; 0 = row untouched); rows are right-padded and their logits
  past the count are meaningless. slots: [B] cache slots the rows go to (default: row b is slot b, and B must
  equal the cache's batch). max_context (static): a bound on every row's length after the step; the compressed
  entries are then read from the first ceil(max_context / page_tokens) pages only, not the whole page table
  (compile once per bucket of it); a row past it is not served and sets `overflow`.

  candidates (static; speculative verification of a short chunk): returns (logits, streams, cache, pending):
  the chunk's compressed entries are in the pages (needed by its own later queries) and the page tables have
  grown, but lengths and per-slot states are those before the chunk; `commit(cache, pending, keep_B)` then
  keeps the first keep_B[b] tokens of each row, exactly as a step of only those tokens would have. Costs S
  copies of the per-slot state (ring + compressor tails), so keep S small.
  """
  cfg = model.cfg
  tokens_BS = jnp.asarray(tokens, jnp.int32)
  if slots is not None:
    slots = jnp.asarray(slots, jnp.int32)
  sc, states, alloc = _open_step(cfg, cache, tokens_BS, counts, slots, max_context, candidates)
  B, S = tokens_BS.shape
  dt = jnp.dtype(cfg.dtype)
  x_BSD = model.embed[...][tokens_BS].astype(dt)
  h = jnp.broadcast_to(x_BSD[:, :, None, :], (B, S, cfg.hc_mult, cfg.hidden_size))
  new_states, new_pools, prefix = [], [], []
  for stack, st, pl in zip(model.stacks, states, cache.pools):
    h, st, pl, pre = stack_step(stack, h, sc, st, pl)
    new_states.append(st)
    new_pools.append(pl)
    prefix.append(pre)
  logits = model.logits(model.norm(model.hc_head(h)))
  cache = _close_step(cache, sc, slots, new_states, new_pools, alloc)
  if not candidates:
    return logits, h, cache
  return logits, h, cache, PendingChunk(tuple(prefix), sc.start_B, sc.count_B, slots)


def commit(cache: InferenceCache, pending: PendingChunk, keep_B) -> InferenceCache:
  """Keeps the first keep_B[b] (clipped to [0, count]) tokens of row b of a candidates-mode chunk: lengths and
  per-slot states become those of a step of exactly these tokens; 0 leaves the row as before the chunk.

  Pages: entries of blocks that only the dropped tokens finished stay written, but past the row's finished
  entries, where nothing reads them and the step that really finishes the block overwrites them (as stale
  entries of a recycled page are); the page table may hold one page more than the length needs, used next.
  """
  keep_B = jnp.clip(jnp.asarray(keep_B, jnp.int32), 0, pending.count_B)
  B = keep_B.shape[0]
  rows = jnp.arange(B)
  slots = pending.slots
  old = cache.states if slots is None else select_rows(cache.states, slots)

  def pick(cand, before):  # cand [R, S, B, ...], before [R, B, ...]
    chosen = cand[:, jnp.maximum(keep_B - 1, 0), rows]
    return jnp.where((keep_B > 0).reshape((1, B) + (1,) * (before.ndim - 2)), chosen, before)

  states = jax.tree.map(pick, pending.prefix_states, old)
  end_B = pending.start_B + keep_B
  if slots is None:
    return cache.replace(lengths=end_B, states=states)
  return cache.replace(lengths=cache.lengths.at[slots].set(end_B), states=scatter_rows(cache.states, states, slots))


def mtp_forward(model, h_BSND, next_tokens, cache: InferenceCache, counts=None, slots=None,
                max_context: int | None = None):
  """Cached MTP block (spec §11): (logits [B, S, V] float32 of the token after next, updated MTP cache).

  Row b's input s sits at position cache.lengths[b] + s and pairs the main model's last-layer streams there
  (h_BSND [B, S, hc, d]) with the embedding of the token that follows it (next_tokens [B, S]): the same inputs
  as the full forward's `mtp_logits`. `cache` is the MTP block's own (dsv4_jax.model.cache.init_mtp_cache).
  """
  cfg = model.cfg
  if not len(model.mtp):
    raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
  tokens_BS = jnp.asarray(next_tokens, jnp.int32)
  if h_BSND.shape != tokens_BS.shape + (cfg.hc_mult, cfg.hidden_size):
    raise ValueError(f"h_BSND must be [B, S, {cfg.hc_mult}, {cfg.hidden_size}] for next_tokens {tokens_BS.shape},"
                     f" got {h_BSND.shape}")
  if len(cache.states) != 1 or len(cache.states[0]) != 1:
    raise ValueError("mtp_forward needs the MTP block's own cache (init_mtp_cache), got a main-model cache")
  if slots is not None:
    slots = jnp.asarray(slots, jnp.int32)
  sc, states, alloc = _open_step(cfg, cache, tokens_BS, counts, slots, max_context)
  mtp, dt = model.mtp[0], jnp.dtype(cfg.dtype)
  h_BSND = h_BSND.astype(dt)
  e = jnp.einsum("BSD,DE->BSE", mtp.enorm(model.embed[...][tokens_BS].astype(dt)), mtp.e_proj[...].astype(dt))
  x = jnp.einsum("BSND,DE->BSNE", mtp.hnorm(h_BSND), mtp.h_proj[...].astype(dt))
  layer_state = jax.tree.map(lambda a: a[0], states[0][0])
  h, layer_state, pool = block_step(mtp.block, e[:, :, None, :] + x, sc, layer_state, cache.pools[0][0], 0)
  states = ((jax.tree.map(lambda a: a[None], layer_state),),)
  logits = model.logits(mtp.norm(mtp.hc_head(h)))
  return logits, _close_step(cache, sc, slots, states, ((pool,),), alloc)
