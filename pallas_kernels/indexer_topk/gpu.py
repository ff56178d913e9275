"""Mosaic GPU (Hopper) kernel of the lightning indexer's scores; the GPU path of indexer_topk.

I[t, s] = Σ_h w[t, h] · relu(q[t, h] · k[s]) for one chunk of queries against every entry, written as [rows, N]
float32: the reference first writes relu(q·k) for every head ([rows, H, N], H = 64 times the bytes). Per query
chunk the selection then gives the reference's `top_visible` result (radix select, or lax.top_k over few
entries), so the [S, N] matrix exists only a chunk at a time, as in the reference.

One CTA (one warpgroup) per (query row, TILES tiles of 64 entries). It bulk-copies the row's q ([D/64, H, 64]
bf16, 128-byte swizzled) and w [H], reads the row's visible end, and, unless every one of its entries is past that
end (causal queries: about half of the CTAs stop there), copies its tiles of k ([64 entries, D] each, TMA, all
in flight at once); per tile D/64 WGMMAs (A = the entries from shared memory, B = qᵀ) give the [64 entries, H]
logits in float32; relu, times w, summed over the heads: one float32 per entry. Entries past the end are still
scored inside a live CTA's tiles, and entries of a stopped CTA are left unwritten: the caller masks both
(`top_visible` selects only visible entries).

Requirements (`supports`): D a multiple of 64 up to 256, H <= 256, B·C <= 65535 rows per call (the chunking
keeps to it). On the H200 (experiments/check_indexer_topk_gpu.py, 2026-11-30): scores within 3.2e-7 of the
float32 reference, the op's top-512 identical to the reference's; experiments/results/kernels.md times it.
The per-chunk top-k over many entries is radix select (radix_select.py: lax.top_k's result without sorting
the [C, N] chunk; experiments/bench_indexer_select.py: 2.4 ms a chunk against top_k's 4.7-5.2 on the H200).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.indexer_topk.radix_select import radix_top_visible
from pallas_kernels.indexer_topk.reference import indexer_topk_reference, top_visible
from pallas_kernels.paged_index_scores.gpu import (_OUT_KWARG, TILE,  # TILE: entries per WGMMA (its M)
                                                   _round_up, weighted_relu_scores)

TILES = 8  # tiles per CTA, all copies in flight together
COLS = 64  # dims per swizzle atom (128 bytes of bf16)
MAX_ROWS = 65535  # CUDA's cap on the grid dimension the rows go to
_SMEM_BYTES = 200 * 1024  # of the 227 KiB a block may use: Mosaic GPU adds its own scratch
SCORE_BUDGET = 1 << 26  # float32 elements of one chunk's [B, C, N] scores (256 MiB)
SELECTION = "auto"  # per-chunk top-k: "radix" (radix_select), "sort" (lax.top_k; equal results) or "auto"
RADIX_MIN_ENTRIES = 4096  # "auto": radix from this many entries (H200, whole op: N 2048 sort 1.72 ms, radix
# 1.78; N 8192 30.5 vs 21.1; N 32768 442 vs 303)
RADIX_BITS = 2  # bits a round: 2 measured fastest on the H200 (1, 2, 4: 3.4, 2.4, 2.9-3.1 ms a chunk)


def supports(d: int, heads: int) -> bool:
  """Whether the kernel takes this head shape (else the reference runs)."""
  return d % COLS == 0 and 0 < d <= 256 and 0 < heads <= 256


def _call(rows, rows_per_b, n_cta, hp, dp, tiles):
  nd = dp // COLS
  tiled = (plgpu.TilingTransform((8, COLS)), plgpu.SwizzleTransform(128))
  head_layout = plgpu.Layout.WGMMA.reduce(0)

  def body(q_ref, w_ref, end_ref, k_ref, out_ref, q_smem, w_smem, end_smem, slots, out_smem, in_bar, tile_bar):
    n, cta = lax.axis_index("n"), lax.axis_index("c")
    b = n // rows_per_b
    for c in range(nd):
      plgpu.copy_gmem_to_smem(q_ref.at[n, c], q_smem.at[c], in_bar)
    plgpu.copy_gmem_to_smem(w_ref.at[n], w_smem, in_bar)
    plgpu.copy_gmem_to_smem(end_ref.at[n], end_smem, in_bar)
    plgpu.barrier_wait(in_bar)
    first = cta * (tiles * TILE)

    @pl.when(first < end_smem[0])
    def _live():
      for t in range(tiles):
        for c in range(nd):
          plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(first + t * TILE, TILE), pl.ds(c * COLS, COLS)],
                                  slots.at[t, c], tile_bar.at[t])
      w = plgpu.load(w_smem, (), layout=head_layout)  # idx: required before jax 0.11

      @pl.loop(0, tiles)
      def _tile(t):
        plgpu.barrier_wait(tile_bar.at[t])
        out_smem[t] = weighted_relu_scores([slots.at[t, c] for c in range(nd)], [q_smem.at[c] for c in range(nd)], w)

      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_ref.at[n, pl.ds(cta * tiles, tiles)])
      plgpu.wait_smem_to_gmem(0)

  scratch = [
      plgpu.SMEM((nd, hp, COLS), jnp.bfloat16, transforms=tiled),
      plgpu.SMEM((hp,), jnp.float32),
      plgpu.SMEM((32,), jnp.int32),  # the row's visible end, repeated (a copy moves a multiple of 128 bytes)
      plgpu.SMEM((tiles, nd, TILE, COLS), jnp.bfloat16, transforms=tiled),
      plgpu.SMEM((tiles, TILE), jnp.float32),
      plgpu.Barrier(num_arrivals=nd + 2),
      plgpu.Barrier(num_arrivals=nd, num_barriers=tiles),
  ]
  return plgpu.kernel(
      body,
      **{_OUT_KWARG: jax.ShapeDtypeStruct((rows, n_cta * tiles, TILE), jnp.float32)},
      grid=(rows, n_cta),
      grid_names=("n", "c"),
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
  )


def _tiles_that_fit(hp: int, dp: int) -> int:
  """TILES, or fewer where q, w and the tiles would pass the shared memory (D = 256 with many heads)."""
  fixed = dp * hp * 2 + hp * 4 + 128 + 1024
  per_tile = dp * TILE * 2 + TILE * 4
  return max(1, min(TILES, (_SMEM_BYTES - fixed) // per_tile))


@functools.partial(jax.jit, static_argnames=("tiles",))
def index_scores_gpu(q_BCHD, k_BND, w_BCH, end_BC, *, tiles: int | None = None):
  """I [B, C, N] float32 by the Mosaic GPU kernel (bf16 operands, float32 accumulation); entries at or past a
  query's `end_BC` are unspecified (the caller masks them). `tiles`: tiles of 64 entries per CTA (default TILES,
  fewer where they would not fit)."""
  B, C, H, D = q_BCHD.shape
  N = k_BND.shape[1]
  if not supports(D, H) or B * C > MAX_ROWS:
    raise ValueError(f"the Mosaic GPU index-score kernel takes D a multiple of {COLS} up to 256, H <= 256 and "
                     f"B·C <= {MAX_ROWS} rows; got D {D}, H {H}, B·C {B * C}")
  hp = _round_up(H, 32)  # w's copy: a multiple of 128 bytes
  tiles = tiles or _tiles_that_fit(hp, D)
  n_cta = max(1, -(-N // (tiles * TILE)))
  np_ = n_cta * tiles * TILE
  q = q_BCHD.astype(jnp.bfloat16).reshape(B * C, H, D // COLS, COLS).transpose(0, 2, 1, 3)  # [rows, D/64, H, 64]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - H), (0, 0)))
  w = jnp.pad(w_BCH.astype(jnp.float32).reshape(B * C, H), ((0, 0), (0, hp - H)))
  end = jnp.broadcast_to(end_BC.astype(jnp.int32).reshape(B * C, 1), (B * C, 32))
  k = jnp.pad(k_BND.astype(jnp.bfloat16), ((0, 0), (0, np_ - N), (0, 0)))
  out = _call(B * C, C, n_cta, hp, D, tiles)(q, w, end, k)
  return out.reshape(B, C, np_)[:, :, :N]


def indexer_topk_gpu(q_BSHD, k_BND, w_BSH, start_BS, end_BS, *, topk: int, query_chunk: int | None = None,
                     selection: str = SELECTION, radix_bits: int = RADIX_BITS):
  """The op with the Mosaic GPU scores: queries in chunks of C (at most SCORE_BUDGET scores and MAX_ROWS rows
  per chunk), each chunk scored by the kernel and selected by `selection`: "sort" (the reference's
  top_visible: lax.top_k), "radix" (radix_select.radix_top_visible, the same result without sorting the
  chunk; `radix_bits` bits per round) or "auto" (radix from RADIX_MIN_ENTRIES entries, where it is faster)."""
  if selection not in ("auto", "sort", "radix"):
    raise ValueError(f"selection={selection!r}; expected 'auto', 'sort' or 'radix'")
  B, S, _, _ = q_BSHD.shape
  N = k_BND.shape[1]
  if selection == "auto":
    selection = "radix" if N >= RADIX_MIN_ENTRIES else "sort"
  chunk = query_chunk or max(1, min(S, SCORE_BUDGET // max(1, B * N)))
  chunk = max(1, min(chunk, MAX_ROWS // B))
  select = top_visible if selection == "sort" else functools.partial(radix_top_visible, bits=radix_bits)
  return indexer_topk_reference(q_BSHD, k_BND, w_BSH, start_BS, end_BS, topk=topk, query_chunk=chunk,
                                scores=index_scores_gpu, select=select)
