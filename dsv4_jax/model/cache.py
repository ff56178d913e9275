"""The inference cache (spec §8.2): a per-sequence state cache plus a paged pool of finished compressed entries.

State cache, one row per batch slot, for every main layer:
  * `window`: ring of the last `sliding_window` raw K=V entries (slot = position % sliding_window);
  * `kv` / `score` (CSA, HCA; and the indexer's own compressor in CSA layers): the compressor tail, float32
    [coff·m, coff·c] as the official `kv_state` / `score_state` (score includes `ape`): rows [0, m) hold the
    previous block (its first half of the channels feeds the CSA overlap), rows [(coff-1)·m, coff·m) the
    unfinished block, so state row e holds position (pos // m)·m - (coff-1)·m + e.
Paged cache: each page covers `page_tokens` raw tokens of one sequence in every layer, i.e. page_tokens / m
entries per CSA / HCA layer and page_tokens / 4 indexer keys per CSA layer; `page_table[b, j]` is the page
holding tokens [j·T, (j+1)·T) of slot b (-1 = none). Pages come from a free stack, so sequences grow without
reallocation; the pool is allocated up front (batch · ceil(max_len / T) pages unless told otherwise). A page
filled to its end is never written again, so forks share such pages (page_refcounts).

Every per-layer array has a leading axis of the layer stack's repeats (the scanned parameter layout).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dsv4_jax.model import kv_format as kvf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressorState:
  kv: jax.Array  # [R, B, coff·m, coff·c] float32
  score: jax.Array  # [R, B, coff·m, coff·c] float32 (gate logits + ape; -inf where empty)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerState:
  """Per-slot state of one layer position of a stack (leading axis: repeats)."""
  window: jax.Array  # [R, B, Wr, E] storage rows, Wr = min(sliding_window, max_len)
  compressor: CompressorState | None  # CSA / HCA
  index_compressor: CompressorState | None  # CSA


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerPool:
  """Pages of finished compressed entries of one layer position (shared by all slots)."""
  entries: jax.Array | None  # [R, num_pages, page_tokens // m, E]
  index_keys: jax.Array | None  # [R, num_pages, page_tokens // 4, Ei]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InferenceCache:
  lengths: jax.Array  # [B] int32 tokens held per slot
  page_table: jax.Array  # [B, max_pages] int32, -1 = none
  free_pages: jax.Array  # [num_pages] int32 stack; entries [0, num_free) are free
  num_free: jax.Array  # [] int32
  overflow: jax.Array  # [] bool: a step ran out of pages or past max_len (its writes were dropped)
  states: tuple  # per stack: tuple per unit position of LayerState
  pools: tuple  # per stack: tuple per unit position of LayerPool
  kv_format: str = dataclasses.field(metadata=dict(static=True), default="fp8")
  page_tokens: int = dataclasses.field(metadata=dict(static=True), default=256)
  max_len: int = dataclasses.field(metadata=dict(static=True), default=0)

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_pages(self) -> int:
    return self.page_table.shape[1]

  @property
  def num_pages(self) -> int:
    return self.free_pages.shape[0]

  def replace(self, **changes) -> "InferenceCache":
    return dataclasses.replace(self, **changes)


def _compressor_state(R: int, B: int, ratio: int, dim: int) -> CompressorState:
  coff = 2 if ratio == 4 else 1
  shape = (R, B, coff * ratio, coff * dim)
  return CompressorState(jnp.zeros(shape, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32))


def page_unit(cfg) -> int:
  """Tokens a page must be a multiple of: the lcm of the compression ratios (128 for V4)."""
  ratios = [r for r in cfg.main_ratios if r]
  return math.lcm(*ratios) if ratios else 1


def init_cache(cfg, plan, batch: int, max_len: int, *, kv_format: str = "fp8", page_tokens: int | None = None,
               num_pages: int | None = None) -> InferenceCache:
  """An empty cache for `batch` slots of up to `max_len` tokens each (see the module docstring).

  plan: the model's layer plan [(unit specs, repeats)]. page_tokens defaults to 256 (a multiple of every
  ratio); num_pages to batch · ceil(max_len / page_tokens) (no slot can run out).
  """
  kvf.check_format(kv_format)
  if batch < 1 or max_len < 1:
    raise ValueError(f"batch ({batch}) and max_len ({max_len}) must be >= 1")
  unit = page_unit(cfg)
  page_tokens = max(256, unit) if page_tokens is None else page_tokens
  if page_tokens < 1 or page_tokens % unit:
    raise ValueError(f"page_tokens={page_tokens} must be a positive multiple of {unit} (lcm of the ratios)")
  max_pages = -(-max_len // page_tokens)
  num_pages = batch * max_pages if num_pages is None else num_pages
  if num_pages < 1:
    raise ValueError(f"num_pages={num_pages} must be >= 1")
  e_width, e_dtype = kvf.entry_width(cfg, kv_format)
  k_width, k_dtype = kvf.key_width(cfg, kv_format)
  ring = min(cfg.sliding_window, max_len)
  states, pools = [], []
  for specs, R in plan:
    st, pl = [], []
    for spec in specs:
      m = spec.ratio
      st.append(LayerState(
          window=jnp.zeros((R, batch, ring, e_width), e_dtype),
          compressor=_compressor_state(R, batch, m, cfg.head_dim) if m else None,
          index_compressor=_compressor_state(R, batch, 4, cfg.index_head_dim) if m == 4 else None))
      pl.append(LayerPool(
          entries=jnp.zeros((R, num_pages, page_tokens // m, e_width), e_dtype) if m else None,
          index_keys=jnp.zeros((R, num_pages, page_tokens // 4, k_width), k_dtype) if m == 4 else None))
    states.append(tuple(st))
    pools.append(tuple(pl))
  return InferenceCache(
      lengths=jnp.zeros((batch,), jnp.int32), page_table=jnp.full((batch, max_pages), -1, jnp.int32),
      free_pages=jnp.arange(num_pages, dtype=jnp.int32)[::-1], num_free=jnp.asarray(num_pages, jnp.int32),
      overflow=jnp.asarray(False), states=tuple(states), pools=tuple(pools), kv_format=kv_format,
      page_tokens=page_tokens, max_len=max_len)


class _MTPLayer:
  """The one layer of the MTP block as a layer-plan entry (init_cache reads only `ratio`)."""

  def __init__(self, ratio: int):
    self.ratio = ratio


def init_mtp_cache(cfg, batch: int, max_len: int, *, kv_format: str = "fp8", page_tokens: int | None = None,
                   num_pages: int | None = None) -> InferenceCache:
  """An empty cache for the MTP block (speculative decoding): the layout of init_cache for its one layer, one
  stack of one repeat; position t holds the MTP input at t (main streams at t, embedding of token t+1)."""
  if not cfg.mtp_ratios:
    raise ValueError("the config has no MTP block (num_nextn_predict_layers = 0)")
  ratio = cfg.mtp_ratios[0]
  if ratio and page_tokens is not None and page_tokens % ratio:
    raise ValueError(f"page_tokens={page_tokens} must be a multiple of the MTP layer's ratio {ratio}")
  if ratio and page_tokens is None:
    page_tokens = math.lcm(max(256, page_unit(cfg)), ratio)
  return init_cache(cfg, [((_MTPLayer(ratio),), 1)], batch, max_len, kv_format=kv_format, page_tokens=page_tokens,
                    num_pages=num_pages)


def allocate_pages(cache: InferenceCache, page_table_BP, new_lengths_B):
  """Pages for rows growing to `new_lengths_B` tokens, popped from the free stack.

  Returns (page_table_BP, free_pages, num_free, overflow): rows that cannot get a page (pool exhausted) or grow
  past max_len keep -1 there (their writes are dropped) and set `overflow`.
  """
  T, P = cache.page_tokens, page_table_BP.shape[1]
  held_B = jnp.sum(page_table_BP >= 0, axis=1).astype(jnp.int32)
  want_B = jnp.minimum(-(-new_lengths_B // T), P)
  need_B = jnp.maximum(want_B - held_B, 0)
  start_B = jnp.cumsum(need_B) - need_B
  j_P = jnp.arange(P, dtype=jnp.int32)
  k_BP = start_B[:, None] + j_P[None, :] - held_B[:, None]  # rank of the page popped for slot j
  new_BP = (j_P[None, :] >= held_B[:, None]) & (j_P[None, :] < (held_B + need_B)[:, None])
  stack_BP = cache.num_free - 1 - k_BP
  popped_BP = jnp.where(stack_BP >= 0, cache.free_pages[jnp.maximum(stack_BP, 0)], -1)
  page_table_BP = jnp.where(new_BP, popped_BP, page_table_BP)
  total = jnp.sum(need_B)
  overflow = (total > cache.num_free) | jnp.any(new_lengths_B > cache.max_len)
  return page_table_BP, cache.free_pages, jnp.maximum(cache.num_free - total, 0), overflow


def page_refcounts(cache: InferenceCache) -> jax.Array:
  """[num_pages] int32: how many slots' page tables hold each page (0 = free).

  A fork (dsv4_jax.serve.cache.fork_slot) shares the source's finished pages, so a page may be held by several
  slots; releasing a slot frees only the pages no other slot holds. The count is derived from the page table,
  not stored beside it, so it can never disagree with it (and steps that allocate pages need not maintain it).
  """
  pages = cache.page_table.reshape(-1)
  pages = jnp.where(pages >= 0, pages, cache.num_pages)  # -1 -> past the end: dropped
  return jnp.zeros((cache.num_pages,), jnp.int32).at[pages].add(1, mode="drop")


def select_rows(tree, slots):
  """Per-slot state rows `slots` (axis 1 of every leaf: [R, B, ...])."""
  return jax.tree.map(lambda a: a[:, slots], tree)


def scatter_rows(tree, rows, slots):
  return jax.tree.map(lambda a, r: a.at[:, slots].set(r), tree, rows)


# ----- sharding (GSPMD) --------------------------------------------------------------------------------------------
CACHE_AXES = ("data", "fsdp")  # the mesh axes the slots and pages are split over (dsv4_jax.sharding.MESH_AXES)


def _split_axes(size: int, mesh, axes) -> tuple:
  """The mesh axes among `axes` (in order) whose running product divides `size` (a greedy choice)."""
  chosen, product = [], 1
  for name in axes:
    n = mesh.shape.get(name, 1)
    if n > 1 and size % (product * n) == 0:
      chosen.append(name)
      product *= n
  return tuple(chosen)


def cache_shardings(cache: InferenceCache, mesh, axes=CACHE_AXES) -> InferenceCache:
  """A NamedSharding for every array of `cache` (also of `jax.eval_shape(...)` of one): the pytree to pin as a jitted
  step's cache in / out shardings (dsv4_jax.serve.steps) and to `shard_cache` with.

  * slot axis (axis 1 of every state leaf: window rings, compressor tails; axis 0 of lengths and page_table):
    split over the `axes` of `mesh` whose product divides the batch;
  * page axis (axis 1 of every pool leaf: compressed entries, indexer keys): split over the `axes` whose product
    divides num_pages. The pool is the big part (pages for batch · max_len tokens), so it is what must not be
    replicated: each device holds num_pages / (data · fsdp) pages;
  * everything else (free stack, num_free, overflow; the repeat and entry axes) replicated, and so is everything
    over the axes not listed ("expert", "tensor": V4 attention has one KV head, so nothing to split by head;
    pass axes=dsv4_jax.sharding.BATCH_AXES to also split over "expert").
  A dimension no listed axis divides stays whole, so any cache runs on any mesh (a tiny one ends up replicated).

  Communication this implies (jit inserts it; any sharding gives the same results): pages come from one free
  stack, so a slot's pages lie on any device, not on the device of its state rows. A step reads a slot's entries
  by page_table index: each device gathers from the pages it holds (the others masked) and the partial reads
  are summed across the page-axis devices, i.e. an all-reduce of the gathered rows (B · context entries per
  layer: indexer keys and HCA entries; only the top-k picks of CSA entries), plus collective-permutes of such
  rows between layouts, never an all-gather of the pool (`python tests/serve_sharded_check.py --collectives`).
  Writes of new entries scatter into the one device holding the page (updates replicated, no exchange). Per-slot
  state rows and the page table are local to their slot's devices; the small gathers/scatters by `slots`
  (continuous batching) move only those rows. Placing a slot's pages on its own devices (a free stack per
  shard) would make page reads local; not done.
  The MTP block's own cache (init_mtp_cache) has the same layout and takes the same call.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P

  def spec(a, axis: int, size: int) -> NamedSharding:
    split = _split_axes(size, mesh, axes)
    parts = [None] * a.ndim
    if split:
      parts[axis] = split
    return NamedSharding(mesh, P(*parts))

  replicated = lambda a: NamedSharding(mesh, P())
  slots = lambda a: spec(a, 1, cache.batch)
  pages = lambda a: spec(a, 1, cache.num_pages)
  return cache.replace(
      lengths=spec(cache.lengths, 0, cache.batch), page_table=spec(cache.page_table, 0, cache.batch),
      free_pages=replicated(cache.free_pages), num_free=replicated(cache.num_free),
      overflow=replicated(cache.overflow), states=jax.tree.map(slots, cache.states),
      pools=jax.tree.map(pages, cache.pools))


def shard_cache(cache: InferenceCache, mesh, axes=CACHE_AXES) -> InferenceCache:
  """`cache` placed on `mesh` as cache_shardings says (arrays already placed so are kept, not copied).

    mesh = dsv4_jax.sharding.make_mesh(data=2, fsdp=2, expert=2)
    cache = shard_cache(model.init_cache(batch, max_len), mesh)
  """
  return jax.device_put(cache, cache_shardings(cache, mesh, axes))
