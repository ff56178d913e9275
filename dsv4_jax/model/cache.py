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

Page shards (page_shards = D, default 1): slots and pages are cut into D equal ranges, and slot b (shard
b // (batch / D)) takes pages only from its shard's ids [s · num_pages / D, (s+1) · num_pages / D), each shard
with its own free stack (free_pages [D, num_pages / D], num_free [D]; D = 1 keeps the flat [num_pages] / []
layout). Sharded over D devices (cache_shardings), a slot's pages then lie on its own device, so a step reads
and writes them there (dsv4_jax.model.decode, page reads per shard) instead of gathering across devices.

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
  free_pages: jax.Array  # [num_pages] int32 stack; entries [0, num_free) are free ([D, num_pages/D] per shard)
  num_free: jax.Array  # [] int32 ([D] per shard)
  overflow: jax.Array  # [] bool: a step ran out of pages or past max_len (its writes were dropped)
  states: tuple  # per stack: tuple per unit position of LayerState
  pools: tuple  # per stack: tuple per unit position of LayerPool
  kv_format: str = dataclasses.field(metadata=dict(static=True), default="fp8")
  page_tokens: int = dataclasses.field(metadata=dict(static=True), default=256)
  max_len: int = dataclasses.field(metadata=dict(static=True), default=0)
  page_shards: int = dataclasses.field(metadata=dict(static=True), default=1)

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_pages(self) -> int:
    return self.page_table.shape[1]

  @property
  def num_pages(self) -> int:
    return math.prod(self.free_pages.shape)

  @property
  def shard_pages(self) -> int:
    """Pages per page shard (num_pages / page_shards)."""
    return self.num_pages // self.page_shards

  def slot_shard(self, slots_B):
    """The page shard of each slot id."""
    return slots_B // (self.batch // self.page_shards)

  def free_stacks(self):
    """(free_pages [D, num_pages / D], num_free [D]): the per-shard free stacks (views of either layout)."""
    return self.free_pages.reshape(self.page_shards, -1), self.num_free.reshape(self.page_shards)

  def stacked_like(self, free_DN, num_free_D):
    """free_stacks-shaped arrays back in this cache's layout (flat for one shard)."""
    return free_DN.reshape(self.free_pages.shape), num_free_D.reshape(self.num_free.shape)

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
               num_pages: int | None = None, page_shards: int = 1) -> InferenceCache:
  """An empty cache for `batch` slots of up to `max_len` tokens each (see the module docstring).

  plan: the model's layer plan [(unit specs, repeats)]. page_tokens defaults to 256 (a multiple of every
  ratio); num_pages to batch · ceil(max_len / page_tokens) (no slot can run out). page_shards: free stacks per
  shard of slots (must divide batch and num_pages; `mesh_page_shards(mesh, batch)` for a mesh).
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
  if page_shards < 1 or batch % page_shards or num_pages % page_shards:
    raise ValueError(f"page_shards={page_shards} must be >= 1 and divide batch ({batch}) and num_pages "
                     f"({num_pages})")
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
  n = num_pages // page_shards  # each stack pops its shard's lowest ids first
  free_pages = jnp.arange(num_pages, dtype=jnp.int32).reshape(page_shards, n)[:, ::-1]
  num_free = jnp.full((page_shards,), n, jnp.int32)
  if page_shards == 1:
    free_pages, num_free = free_pages.reshape(num_pages), num_free.reshape(())
  return InferenceCache(
      lengths=jnp.zeros((batch,), jnp.int32), page_table=jnp.full((batch, max_pages), -1, jnp.int32),
      free_pages=free_pages, num_free=num_free, overflow=jnp.asarray(False), states=tuple(states),
      pools=tuple(pools), kv_format=kv_format, page_tokens=page_tokens, max_len=max_len, page_shards=page_shards)


class _MTPLayer:
  """The one layer of the MTP block as a layer-plan entry (init_cache reads only `ratio`)."""

  def __init__(self, ratio: int):
    self.ratio = ratio


def init_mtp_cache(cfg, batch: int, max_len: int, *, kv_format: str = "fp8", page_tokens: int | None = None,
                   num_pages: int | None = None, page_shards: int = 1) -> InferenceCache:
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
                    num_pages=num_pages, page_shards=page_shards)


def allocate_pages(cache: InferenceCache, page_table_BP, new_lengths_B, slots_B=None):
  """Pages for rows growing to `new_lengths_B` tokens, popped from the free stack of each row's page shard.

  slots_B: the cache slot of each row (default: row b is slot b); it picks the shard. Returns (page_table_BP,
  free_pages, num_free, overflow) in the cache's layout: rows that cannot get a page (their shard's stack
  exhausted) or grow past max_len keep -1 there (their writes are dropped) and set `overflow`.
  """
  T, (B, P), D = cache.page_tokens, page_table_BP.shape, cache.page_shards
  free_DN, num_free_D = cache.free_stacks()
  slots_B = jnp.arange(B, dtype=jnp.int32) if slots_B is None else slots_B
  shard_B = cache.slot_shard(slots_B)
  held_B = jnp.sum(page_table_BP >= 0, axis=1).astype(jnp.int32)
  want_B = jnp.minimum(-(-new_lengths_B // T), P)
  need_B = jnp.maximum(want_B - held_B, 0)
  need_BD = jnp.where(shard_B[:, None] == jnp.arange(D), need_B[:, None], 0)
  start_B = jnp.take_along_axis(jnp.cumsum(need_BD, axis=0) - need_BD, shard_B[:, None], axis=1)[:, 0]
  j_P = jnp.arange(P, dtype=jnp.int32)
  k_BP = start_B[:, None] + j_P[None, :] - held_B[:, None]  # rank in its shard of the page popped for slot j
  new_BP = (j_P[None, :] >= held_B[:, None]) & (j_P[None, :] < (held_B + need_B)[:, None])
  stack_BP = num_free_D[shard_B][:, None] - 1 - k_BP
  popped_BP = jnp.where(stack_BP >= 0, free_DN[shard_B[:, None], jnp.maximum(stack_BP, 0)], -1)
  page_table_BP = jnp.where(new_BP, popped_BP, page_table_BP)
  total_D = jnp.sum(need_BD, axis=0)
  overflow = jnp.any(total_D > num_free_D) | jnp.any(new_lengths_B > cache.max_len)
  free, num_free = cache.stacked_like(free_DN, jnp.maximum(num_free_D - total_D, 0))
  return page_table_BP, free, num_free, overflow


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


def mesh_page_shards(mesh, batch: int, axes=CACHE_AXES) -> int:
  """The page_shards for a cache of `batch` slots on `mesh`: the product of the `axes` that split the slots
  (init_cache(..., page_shards=...); its default num_pages is then divisible too)."""
  return math.prod(mesh.shape[a] for a in _split_axes(batch, mesh, axes))


def local_page_axes(cache: InferenceCache, mesh, axes=CACHE_AXES) -> tuple:
  """The mesh axes that split `cache`'s slots and pages into its page shards, one shard per device (so a slot's
  pages are on its device): () unless page_shards > 1 and these axes' product is exactly page_shards."""
  if cache.page_shards == 1 or mesh is None or mesh.empty:
    return ()
  split = _split_axes(cache.page_shards, mesh, axes)
  return split if math.prod(mesh.shape[a] for a in split) == cache.page_shards else ()


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
  With page_shards > 1 both slots and pages are split over the `axes` whose product divides page_shards, so a
  slot's page shard lies on its slot's devices (page reads local when the product is page_shards: see below).

  Communication this implies (jit inserts it; any sharding gives the same results): pages come from one free
  stack, so a slot's pages lie on any device, not on the device of its state rows. A step reads a slot's entries
  by page_table index: each device gathers from the pages it holds (the others masked) and the partial reads
  are summed across the page-axis devices, i.e. an all-reduce of the gathered rows (B · context entries per
  layer: indexer keys and HCA entries; only the top-k picks of CSA entries), plus collective-permutes of such
  rows between layouts, never an all-gather of the pool (`python tests/serve_sharded_check.py --collectives`).
  Writes of new entries scatter into the one device holding the page (updates replicated, no exchange). Per-slot
  state rows and the page table are local to their slot's devices; the small gathers/scatters by `slots`
  (continuous batching) move only those rows.
  Page shards (init_cache(..., page_shards=mesh_page_shards(mesh, batch))): a slot's pages come from its own
  shard's free stack, so they lie on its devices; a step over all slots (decode, prefill without `slots`) then
  reads and writes the pages inside jax.shard_map with local page ids (dsv4_jax.model.decode), no exchange of
  gathered rows. Steps on a subset of slots (`slots=`) still read as above.
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
  sizes = (cache.batch, cache.num_pages) if cache.page_shards == 1 else (cache.page_shards,) * 2
  slots = lambda a: spec(a, 1, sizes[0])
  pages = lambda a: spec(a, 1, sizes[1])
  return cache.replace(
      lengths=spec(cache.lengths, 0, sizes[0]), page_table=spec(cache.page_table, 0, sizes[0]),
      free_pages=replicated(cache.free_pages), num_free=replicated(cache.num_free),
      overflow=replicated(cache.overflow), states=jax.tree.map(slots, cache.states),
      pools=jax.tree.map(pages, cache.pools))


def shard_cache(cache: InferenceCache, mesh, axes=CACHE_AXES) -> InferenceCache:
  """`cache` placed on `mesh` as cache_shardings says (arrays already placed so are kept, not copied).

    mesh = dsv4_jax.sharding.make_mesh(data=2, fsdp=2, expert=2)
    cache = shard_cache(model.init_cache(batch, max_len), mesh)
  """
  return jax.device_put(cache, cache_shardings(cache, mesh, axes))
