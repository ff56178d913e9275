"""Mosaic GPU (Hopper) kernel of paged FP4 index scores: decode the packed keys in registers, score them on the
tensor cores, write only I [rows, N] float32.

What it replaces in a decode step: the XLA path gathers each sequence's packed keys, writes them out decoded
([B, N, 128] bf16), then writes relu(q·k) for every head ([B, H, N] float32) before the weighted head sum; at
128K context and batch 64 that is ~1 GB of HBM traffic per CSA layer for 142 MB of packed keys.

One CTA (one warpgroup) per (query row, TILES tiles of 64 keys). It bulk-copies the row's q (as its even and
odd dims, [2, H, 64] bf16, 128-byte swizzled), w [H] and the tiles' page-row starts, then every tile's packed
rows straight from the page pool (one contiguous copy per page run: 64 keys × 68 bytes, or two runs of 32 for
32-key pages), all in flight at once. Per tile, each thread decodes its share of the [64 keys, 64 dims] A
operand twice (the even dims are the low nibbles, the odd dims the high nibbles of the same bytes, so one
16-bit load feeds both), and two WGMMAs (A from registers, B = qᵀ from shared memory) give the [64 keys, H]
logits in float32; relu, times w, summed over the heads, one float32 per key. Splitting the contraction into
even and odd dims is what avoids interleaving nibbles: q·k = q_even·k_even + q_odd·k_odd.

Requirements (`supports`): d = 128 (68-byte rows), H <= 256, 32 | keys per page (every copy moves a multiple of
128 bytes; page_tokens is a multiple of 128, so K = page_tokens / 4 always is). The CUDA lowering is checked
on any machine (tests/test_paged_index_scores.py); results and speed on the H200: experiments/check_paged_index_scores.py.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_index_scores import fp4

TILE = 64  # keys per WGMMA (its M)
TILES = 8  # tiles per CTA: all their copies are in flight together
HALF = 64  # dims per operand half (even / odd): one 128-byte swizzle atom of bf16
D = 2 * HALF
ROW = fp4.row_bytes(D)  # 68
QUAD = 4  # keys per row of the pool as the copies see it: 272 bytes (a bulk copy's row stride is a multiple of 16)
_MAX_GRID = 65535
_OUT_KWARG = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"


def supports(d: int, heads: int, keys_per_page: int, rows: int) -> bool:
  """Whether the kernel takes this shape (else implementation='auto' runs the reference)."""
  return d == D and 0 < heads <= 256 and keys_per_page % 32 == 0 and 0 < rows <= _MAX_GRID


def _round_up(x, m):
  return -(-x // m) * m


def _dequant_tile():
  """An inline Mosaic GPU routine: one tile [64 keys, 68 bytes] of packed keys in SMEM -> (even dims, odd dims),
  each a [64, 64] bf16 array in the WGMMA register layout (a WGMMA A operand).

  Each register holds columns j, j+1 of one key row: bytes j and j+1 (one 16-bit load) hold dims 2j .. 2j+3,
  i.e. the even half's pair (low nibbles) and the odd half's (high nibbles), which share the scale of block
  j // 16. Decoding is integer bit placement, both elements of a pair in one 32-bit word (no float math, so
  exact whatever the flush-to-zero mode): code (s, mag = e1 e0 m) times 2^(S - 127) (scale byte S) is the
  bf16 (s << 15) | ((mag << 6) + ((S - 1) << 7)) for mag >= 2 (exponent e + S - 1, mantissa m), 64 less for
  mag = 1 (0.5: exponent S - 1, mantissa 0), and ±0 for mag = 0. Scale bytes 2..252 (2^-125 .. 2^125; what
  kv_format.pack_keys writes). Addresses: the thread's first row and column once, every register a constant
  offset from them (the layout's tile strides)."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415  (Mosaic GPU builders, only when lowering for a GPU)
  from jax._src.lib.mlir.dialects import arith, llvm  # noqa: PLC0415
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415

  out = plgpu.ShapeDtypeStruct((TILE, HALF), jnp.bfloat16, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=(out, out))
  def dequant(_, keys_smem):
    i8, i16, i32 = (ir.IntegerType.get_signless(b) for b in (8, 16, 32))
    vec = ir.VectorType.get((2,), ir.BF16Type.get())

    def c(v):
      return arith.constant(i32, v)

    lanes = c(0x10001)

    def pair(x, exp_bits):  # x: a pair's codes at bits 0-3 and 8-11; exp_bits: (S - 1) << 7 in both lanes
      z = arith.ori(arith.andi(x, c(0xF)), arith.shli(arith.andi(x, c(0xF00)), c(8)))  # lanes: bits 0-3, 16-19
      mag = arith.andi(z, c(0x70007))
      mag1, mag2 = arith.shrui(mag, c(1)), arith.shrui(mag, c(2))
      is_half = arith.andi(arith.andi(mag, arith.xori(arith.ori(mag1, mag2), c(-1))), lanes)  # mag == 1
      nonzero = arith.andi(arith.ori(mag, arith.ori(mag1, mag2)), lanes)
      bits = arith.subi(arith.addi(arith.shli(mag, c(6)), exp_bits), arith.shli(is_half, c(6)))
      bits = arith.andi(bits, arith.muli(nonzero, c(0xFFFF)))
      sign = arith.shli(arith.andi(z, c(0x80008)), c(12))
      return llvm.bitcast(vec, arith.ori(bits, sign))

    layout = mgpu.WGMMA_LAYOUT
    shape = (TILE, HALF)
    regs = layout.registers_shape(shape)
    tile_strides = layout.tiling.tile_strides((HALF, 1))
    dyn_strides = [c(t) for t in tile_strides[-layout.tiled_tiling_rank:]]
    lin0 = arith.addi(mgpu.utils.dyn_dot(layout.warp_indices(), dyn_strides),
                      mgpu.utils.dyn_dot(layout.lane_indices(), dyn_strides))  # row0 · 64 + col0, col0 in 0..6
    row0, col0 = arith.divui(lin0, c(HALF)), arith.remui(lin0, c(HALF))
    row_start = arith.muli(row0, c(ROW))
    code_base = mgpu.utils.getelementptr(mgpu.utils.memref_ptr(keys_smem), [arith.addi(row_start, col0)], i8)
    scale_base = mgpu.utils.getelementptr(mgpu.utils.memref_ptr(keys_smem), [arith.addi(row_start, c(HALF))], i8)
    even, odd = np.empty(regs, dtype=object), np.empty(regs, dtype=object)
    for idx in np.ndindex(regs):
      dr, dc = divmod(sum(i * t for i, t in zip(idx, tile_strides)), HALF)
      assert dc % 8 == 0, dc  # col0 + dc stays in the row and in scale block dc // 16
      u = arith.extui(i32, llvm.load(i16, mgpu.utils.getelementptr(code_base, [dr * ROW + dc], i8)))
      s = arith.extui(i32, llvm.load(i8, mgpu.utils.getelementptr(scale_base, [dr * ROW + dc // 16], i8)))
      exp_bits = arith.muli(arith.shli(arith.subi(s, c(1)), c(7)), lanes)
      even[idx] = pair(arith.andi(u, c(0x0F0F)), exp_bits)
      odd[idx] = pair(arith.andi(arith.shrui(u, c(4)), c(0x0F0F)), exp_bits)
    as_array = lambda r: mgpu.FragmentedArray(_registers=r, _layout=layout, _is_signed=None)
    return as_array(even), as_array(odd)

  return dequant


def weighted_relu_scores(keys, q_parts, w):
  """Σ_h w[h] · relu(k·q_h) for a tile of TILE keys: [TILE] float32 (the WGMMA row layout). keys: the tile's A
  operands over the dims (registers or shared memory, [TILE, 64] each), q_parts: the matching [H, 64] parts of q
  in shared memory (used transposed), w: [H] float32 in the WGMMA column layout. Inside a Mosaic GPU kernel."""
  hp = q_parts[0].shape[0]

  def logits(acc_ref):
    for a, q in zip(keys, q_parts, strict=True):
      plgpu.wgmma(acc_ref, a, q.transpose((1, 0)))
    return acc_ref[...]

  s = pl.run_scoped(logits, plgpu.ACC((TILE, hp), jnp.float32))
  s = jnp.maximum(s, 0.0) * lax.broadcast_in_dim(w, s.shape, [1])
  return s.sum(axis=1)


def _call(rows, n_cta, hp, keys_per_page, q_rows_per_b, interpret, tiles):
  run = min(keys_per_page, TILE)  # keys per contiguous page run
  runs = TILE // run  # copies per tile
  tiled = (plgpu.TilingTransform((8, HALF)), plgpu.SwizzleTransform(128))
  head_layout = plgpu.Layout.WGMMA.reduce(0)

  def body(q_ref, w_ref, start_ref, pages_ref, out_ref, q_smem, w_smem, start_smem, slots, out_smem, in_bar,
           tile_bar):
    n, cta = lax.axis_index("n"), lax.axis_index("c")
    for h in range(2):
      plgpu.copy_gmem_to_smem(q_ref.at[n, h], q_smem.at[h], in_bar)
    plgpu.copy_gmem_to_smem(w_ref.at[n], w_smem, in_bar)
    plgpu.copy_gmem_to_smem(start_ref.at[n // q_rows_per_b, cta], start_smem, in_bar)
    plgpu.barrier_wait(in_bar)
    for t in range(tiles):
      for j in range(runs):
        plgpu.copy_gmem_to_smem(pages_ref.at[pl.ds(start_smem[t * runs + j], run // QUAD)],
                                slots.at[t, pl.ds(j * run // QUAD, run // QUAD)], tile_bar.at[t],
                                oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
    w = plgpu.load(w_smem, (), layout=head_layout)  # idx: required before jax 0.11
    dequant = _dequant_tile()

    @pl.loop(0, tiles)
    def _tile(t):
      plgpu.barrier_wait(tile_bar.at[t])
      even, odd = dequant(slots.at[t])
      out_smem[t] = weighted_relu_scores((even, odd), (q_smem.at[0], q_smem.at[1]), w)

    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[n, pl.ds(cta * tiles, tiles)])
    plgpu.wait_smem_to_gmem(0)

  scratch = [
      plgpu.SMEM((2, hp, HALF), jnp.bfloat16, transforms=tiled),
      plgpu.SMEM((hp,), jnp.float32),
      plgpu.SMEM((_round_up(tiles * runs, 32),), jnp.int32),  # every copy moves a multiple of 128 bytes
      plgpu.SMEM((tiles, TILE // QUAD, QUAD * ROW), jnp.uint8),  # = [tiles, 64 keys, 68 bytes]
      plgpu.SMEM((tiles, TILE), jnp.float32),
      plgpu.Barrier(num_arrivals=4),
      plgpu.Barrier(num_arrivals=runs, num_barriers=tiles),
  ]
  return plgpu.kernel(
      body,
      **{_OUT_KWARG: jax.ShapeDtypeStruct((rows, n_cta * tiles, TILE), jnp.float32)},
      grid=(rows, n_cta),
      grid_names=("n", "c"),
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret,
  )


def run_starts(page_table_BP, keys_per_page: int, n_cta: int, tiles: int = TILES):
  """First pool row (page · K + offset, in rows of QUAD keys) of every page run of every tile:
  [B, n_cta, >= tiles · runs] int32
  (-1 pages and tiles past the table read page 0: scored, then masked by the caller)."""
  run = min(keys_per_page, TILE)
  P = page_table_BP.shape[1]
  key_R = jnp.arange(n_cta * tiles * TILE // run, dtype=jnp.int32) * run  # first key of each run
  slot_R = key_R // keys_per_page
  page_BR = jnp.take(page_table_BP, jnp.minimum(slot_R, P - 1), axis=1)
  page_BR = jnp.where((slot_R < P)[None] & (page_BR >= 0), page_BR, 0)
  start_BR = (page_BR * keys_per_page + key_R % keys_per_page) // QUAD  # in rows of QUAD keys
  start_BCR = start_BR.reshape(page_table_BP.shape[0], n_cta, -1)
  pad = _round_up(start_BCR.shape[-1], 32) - start_BCR.shape[-1]  # every copy moves a multiple of 128 bytes
  return jnp.pad(start_BCR, ((0, 0), (0, 0), (0, pad))).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("interpret", "tiles"))
def paged_index_scores_gpu(q_BSHD, w_BSH, pages_PKE, page_table_BP, *, interpret=None, tiles: int = TILES):
  """I [B, S, P·K] float32 by the Mosaic GPU kernel (see the module docstring for what it takes); `tiles`:
  tiles of 64 keys per CTA."""
  B, S, H, d = q_BSHD.shape
  n_pages, K, E = pages_PKE.shape
  P = page_table_BP.shape[1]
  if not supports(d, H, K, B * S) or E != ROW:
    raise ValueError(f"the Mosaic GPU paged index-score kernel takes d = {D} ({ROW}-byte rows), H <= 256, "
                     f"keys per page a multiple of 32 and B·S <= {_MAX_GRID}; got d {d}, rows of {E} bytes, "
                     f"H {H}, {K} keys per page, B·S {B * S}")
  N = P * K
  n_cta = -(-N // (tiles * TILE))
  hp = _round_up(H, 32)  # w's copy: a multiple of 128 bytes
  q = q_BSHD.astype(jnp.bfloat16).reshape(B * S, H, HALF, 2)
  q = jnp.moveaxis(q, -1, 1)  # [rows, 2 (even, odd dims), H, 64]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - H), (0, 0)))
  w = jnp.pad(w_BSH.astype(jnp.float32).reshape(B * S, H), ((0, 0), (0, hp - H)))
  starts = run_starts(page_table_BP.astype(jnp.int32), K, n_cta, tiles)
  pages = pages_PKE.reshape(n_pages * K // QUAD, QUAD * E)
  out = _call(B * S, n_cta, hp, K, S, interpret, tiles)(q, w, starts, pages)
  return out.reshape(B, S, -1)[:, :, :N]
