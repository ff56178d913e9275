"""Mosaic GPU (Hopper) kernel for gather-sparse attention: the backward pass (dq and dkv).

As in the forward (gpu.py), one CTA per (query, group of 64 heads), the heads the M = 64 rows of the
WGMMAs that produce dq, the BLOCK_K = 64 selected keys of a step the M rows of those that produce dkv. Per step,
with K the step's gathered kv rows (K = V), s = Q·Kᵀ, p = exp(scale·s − lse), dp = dO·Kᵀ and
ds = scale · p ⊙ (dp − delta):

  dq += ds · K                   (each compute warpgroup: its half of D, a [64, D/2] float32 accumulator)
  dkv[idx_j] += dsᵀ·Q + pᵀ·dO    (per 64-column chunk of D, then added to HBM with float32 vector reductions)

Two compute warpgroups each score half of the step's keys (s and dp: [64 heads, 32 keys]), write their halves
of p and ds (16-bit) into shared tiles, and after one exchange both use the whole tiles: as the A operand of
ds·K and, transposed, of dsᵀ·Q and pᵀ·dO. One memory warpgroup gathers the step's rows with cp.async (gpu.py's
routine) into a single slot (Q, dO and the slot fill the shared memory at D = 512); the slot is released once
ds·K has read it, so the gather of step i+1 overlaps step i's dkv products and reductions, which read only Q,
dO and the tiles.

dkv accumulates in a float32 buffer passed in as a mutable ref (jax.new_ref), BLOCK_K rows longer than the kv
rows: selected entry j of a step whose index is -1 adds its zeros to spare row n_kv + j instead of branching.
The reductions are `red.global.add.v4.f32` (REDUCE_WIDTH); their order varies from run to run, so dkv is not
bit-reproducible (like XLA's scatter-add on the GPU). They bound the kernel on the H200: at Flash S = 8K it takes
13.2 ms with them and 7.6 ms with them switched off (experiments/results/kernels.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention.gpu import (_MAX_GRID_ROWS, _OUT_KWARG, BLOCK_H, CHUNK, _cp_async_gather,
                                                 _flat_kv, _query_rows, _round_up, _store_column_half)

BLOCK_K = 64  # selected keys per step: the M dimension of the dkv WGMMAs
REDUCE_WIDTH = 4  # float32 values per dkv reduction (4 after a lane shuffle: 13.2 vs 15.8 ms with 2 at Flash 8K)
_LOG2E = math.log2(math.e)
# dkv is a mutable ref the kernel reads and writes; jax before 0.11 cannot trace a Pallas kernel that takes one
# (vjp.py then runs the XLA backward on the GPU)
SUPPORTED = jax.__version_info__[:2] >= (0, 11)
_SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block (opt-in)


def _slots(dp: int, nblk: int) -> int:
  """Gather slots that fit next to Q, dO, the p/ds tiles and the indices: 2 when they fit, else 1."""
  fixed = 2 * dp * BLOCK_H * 2 + 2 * BLOCK_H * BLOCK_K * 2 + nblk * BLOCK_K * 4 + 4 * BLOCK_H * 4 + 1024
  slot = dp * BLOCK_K * 2
  return 2 if fixed + 2 * slot <= _SMEM_BYTES else 1


def _reduce_rows(n_kv: int, dp: int, chunk: int, width: int):
  """An inline Mosaic GPU routine run by both compute warpgroups: add the [BLOCK_K, 64] float32 block `g` (WGMMA
  register layout; row j = selected entry j of the step) into column chunk w·D/128 + `chunk` of dkv row idx[j]
  for warpgroup w (row n_kv + j where idx[j] is -1).

  width 2: one `red.global.add.v2.f32` per register (a thread holds 2 adjacent columns of rows r and r + 8);
  width 4: lanes 2i and 2i + 1 (adjacent column pairs of the same rows) swap one register pair through a shuffle,
  so the even lane holds 4 columns of row r, the odd one 4 of row r + 8: half as many, 16-byte reductions."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415  (Mosaic GPU builders, only when lowering for a GPU)
  from jax._src.lib.mlir.dialects import arith, llvm, memref  # noqa: PLC0415
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415

  if width not in (2, 4):
    raise ValueError(f"reduction width {width}; expected 2 or 4")

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()))
  def reduce(_, g, dkv_gmem, idx_smem):
    i8, i32, i64 = (ir.IntegerType.get_signless(b) for b in (8, 32, 64))

    def c(v, ty=i32):
      return arith.constant(ty, v)

    base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu.utils.memref_ptr(dkv_gmem))
    half = dp // CHUNK // 2
    tid = mgpu.utils.thread_idx()
    col0 = arith.muli(arith.addi(arith.muli(arith.divui(tid, c(128)), c(half)), c(chunk)), c(CHUNK))

    def address(row, col):  # row: the entry's position j in the step (index), col: i32 within the chunk
      kv_row = memref.load(idx_smem, [row])
      spare = arith.addi(arith.index_cast(i32, row), c(n_kv))
      kv_row = arith.select(arith.cmpi(arith.CmpIPredicate.slt, kv_row, c(0)), spare, kv_row)
      elem = arith.addi(arith.muli(arith.extui(i64, kv_row), c(dp, i64)), arith.extui(i64, arith.addi(col0, col)))
      return mgpu.utils.getelementptr(base, [arith.muli(elem, c(4, i64))], i8)

    cells = [(row, arith.index_cast(i32, col), reg)
             for (row, col), reg in zip(g.layout.thread_idxs(g.shape), g.registers.flat, strict=True)]
    targets = []
    if width == 2:
      for row, col, reg in cells:
        targets.append((address(row, col), [llvm.extractelement(reg, c(k)) for k in (0, 1)]))
    else:
      # registers come as (row r, cols c..c+1), (row r + 8, same cols) for each 8-column group
      odd = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(tid, c(1)), c(0))
      for (row_a, col, reg_a), (row_b, _, reg_b) in zip(cells[0::2], cells[1::2], strict=True):
        got = mgpu.utils.shfl_bfly(arith.select(odd, reg_a, reg_b), 1)  # even sends row r + 8, odd sends row r
        lo = arith.select(odd, got, reg_a)
        hi = arith.select(odd, reg_b, got)
        row = arith.select(odd, row_b, row_a)
        col4 = arith.select(odd, arith.subi(col, c(2)), col)
        targets.append((address(row, col4), [llvm.extractelement(v, c(k)) for v in (lo, hi) for k in (0, 1)]))
    for ptr, vals in targets:
      operands = ", ".join(f"${i + 1}" for i in range(len(vals)))
      llvm.inline_asm(ir.Type.parse("!llvm.void"), [ptr, *vals],
                      f"red.global.relaxed.gpu.add.v{len(vals)}.f32 [$0], {{{operands}}};",
                      "l" + ",f" * len(vals), has_side_effects=True)
    return ()

  return reduce


def _backward_call(n_rows, n_kv, hp, dp, kp, dtype, scale, width):
  nch = dp // CHUNK  # column chunks of D
  half = nch // 2  # chunks owned by each compute warpgroup
  nblk = kp // BLOCK_K
  # grid (row chunk, row, head group), launched as CUDA's (z, y, x): y and z are capped at 65535, so rows past
  # that go to more chunks (no copies of the inputs); the head groups of a query run next to each other
  n_chunks = -(-n_rows // _MAX_GRID_ROWS)
  chunk_rows = -(-n_rows // n_chunks)
  rows_k = BLOCK_K // 2  # keys each compute warpgroup scores per step
  slots = _slots(dp, nblk)
  mem_regs = 40
  compute_regs = min(232, (65536 - 128 * mem_regs) // 256 // 8 * 8)
  tiled = (plgpu.TilingTransform((8, CHUNK)), plgpu.SwizzleTransform(128))
  swizzled = (plgpu.SwizzleTransform(128),)

  def body(q_ref, do_ref, kv_ref, idx_ref, lse_ref, delta_ref, dkv_ref, dq_ref, q_smem, do_smem, slots_ref,
           idx_smem, lse_smem, delta_smem, in_bar, loaded, consumed, tiles, done, p_smem, ds_smem):
    k_tiled, k_rows = slots_ref
    n = lax.axis_index("nc") * chunk_rows + lax.axis_index("n")
    hg = lax.axis_index("hg")
    wg = lax.axis_index("wg")
    heads = pl.ds(hg * BLOCK_H, BLOCK_H)
    live = n < n_rows  # the last chunk may have rows past the end

    @pl.when(live & (wg == 2))
    def _memory():
      for c in range(nch):
        plgpu.copy_gmem_to_smem(q_ref.at[n, heads, pl.ds(c * CHUNK, CHUNK)], q_smem.at[c], in_bar)
        plgpu.copy_gmem_to_smem(do_ref.at[n, heads, pl.ds(c * CHUNK, CHUNK)], do_smem.at[c], in_bar)
      plgpu.copy_gmem_to_smem(idx_ref.at[n], idx_smem, in_bar)
      plgpu.copy_gmem_to_smem(lse_ref.at[n, heads], lse_smem, in_bar)
      plgpu.copy_gmem_to_smem(delta_ref.at[n, heads], delta_smem, in_bar)
      plgpu.set_max_registers(mem_regs, action="decrease")
      plgpu.barrier_wait(in_bar)
      copy_block = _cp_async_gather(1, dp, BLOCK_K)

      @pl.loop(0, nblk)
      def _step(blk):
        slot = lax.rem(blk, slots)

        @pl.when(blk >= slots)
        def _():
          plgpu.barrier_wait(consumed.at[slot])

        copy_block(kv_ref, idx_smem.at[blk], k_rows.at[slot])  # returns once this thread's copies landed
        plgpu.barrier_arrive(loaded.at[slot])

    def _compute():
      plgpu.set_max_registers(compute_regs, action="increase")
      plgpu.barrier_wait(in_bar)
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      mine = pl.ds(pl.multiple_of(wg * rows_k, rows_k), rows_k)
      lse2 = plgpu.load(lse_smem, (), layout=row_layout) * _LOG2E
      delta = plgpu.load(delta_smem, (), layout=row_layout)
      dq = plgpu.layout_cast(jnp.zeros((BLOCK_H, half * CHUNK), jnp.float32), plgpu.Layout.WGMMA)

      def step(blk, dq):
        slot = lax.rem(blk, slots)
        plgpu.barrier_wait(loaded.at[slot])

        def scores(s_ref, dp_ref):
          for c in range(nch):
            plgpu.wgmma(s_ref, q_smem.at[c], k_tiled.at[slot, c, mine].transpose((1, 0)))
          for c in range(nch):
            plgpu.wgmma(dp_ref, do_smem.at[c], k_tiled.at[slot, c, mine].transpose((1, 0)))
          return s_ref[...], dp_ref[...]

        s, dpv = pl.run_scoped(scores, plgpu.ACC((BLOCK_H, rows_k), jnp.float32),
                               plgpu.ACC((BLOCK_H, rows_k), jnp.float32))
        valid = plgpu.load(idx_smem.at[blk, mine], (), layout=plgpu.Layout.WGMMA.reduce(0)) >= 0
        valid = lax.broadcast_in_dim(valid, s.shape, [1])
        p = jnp.where(valid, jnp.exp2(s * (scale * _LOG2E) - lax.broadcast_in_dim(lse2, s.shape, [0])), 0.0)
        ds = p * (dpv - lax.broadcast_in_dim(delta, s.shape, [0])) * scale

        @pl.when(blk > 0)
        def _():
          plgpu.barrier_wait(tiles.at[0])  # the other warpgroup is done reading the previous step's tiles

        _store_column_half(rows_k)(p.astype(dtype), p_smem)
        _store_column_half(rows_k)(ds.astype(dtype), ds_smem)
        plgpu.commit_smem()
        plgpu.barrier_arrive(tiles.at[1])
        plgpu.barrier_wait(tiles.at[1])

        def dq_step(acc_ref):
          for c in range(half):
            plgpu.wgmma(acc_ref.at[:, pl.ds(c * CHUNK, CHUNK)], ds_smem, k_tiled.at[slot, wg * half + c])

        dq = pl.run_state(dq_step)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(consumed.at[slot])
        for c in range(half):
          cc = wg * half + c

          def dkv_chunk(g_ref, cc=cc):
            plgpu.wgmma(g_ref, ds_smem.transpose((1, 0)), q_smem.at[cc])
            plgpu.wgmma(g_ref, p_smem.transpose((1, 0)), do_smem.at[cc])
            return g_ref[...]

          g = pl.run_scoped(dkv_chunk, plgpu.ACC((BLOCK_K, CHUNK), jnp.float32))
          _reduce_rows(n_kv, dp, c, width)(g, dkv_ref, idx_smem.at[blk])
        plgpu.barrier_arrive(tiles.at[0])
        return dq

      dq = lax.fori_loop(0, nblk, step, dq)
      plgpu.barrier_arrive(done)
      plgpu.barrier_wait(done)  # both warpgroups are past their last read of q_smem
      for c in range(half):
        q_smem[wg * half + c] = dq[:, c * CHUNK:(c + 1) * CHUNK].astype(dtype)
      plgpu.commit_smem()
      for c in range(half):
        cc = wg * half + c
        plgpu.copy_smem_to_gmem(q_smem.at[cc], dq_ref.at[n, heads, pl.ds(cc * CHUNK, CHUNK)])
      plgpu.wait_smem_to_gmem(0)

    pl.when(live & (wg < 2))(_compute)

  def entry(q_ref, do_ref, kv_ref, idx_ref, lse_ref, delta_ref, dkv_ref, dq_ref):
    slot_shape = (slots, nch, BLOCK_K, CHUNK)
    slot_refs = plgpu.RefUnion(plgpu.SMEM(slot_shape, dtype, transforms=tiled),
                               plgpu.SMEM(slot_shape, dtype, transforms=swizzled))
    pl.run_scoped(
        lambda *scratch: body(q_ref, do_ref, kv_ref, idx_ref, lse_ref, delta_ref, dkv_ref, dq_ref, *scratch),
        plgpu.SMEM((nch, BLOCK_H, CHUNK), dtype, transforms=tiled),  # Q
        plgpu.SMEM((nch, BLOCK_H, CHUNK), dtype, transforms=tiled),  # dO
        slot_refs,
        plgpu.SMEM((nblk, BLOCK_K), jnp.int32),
        plgpu.SMEM((BLOCK_H,), jnp.float32),  # lse
        plgpu.SMEM((BLOCK_H,), jnp.float32),  # delta
        plgpu.Barrier(num_arrivals=2 * nch + 3),
        plgpu.Barrier(num_arrivals=1, num_barriers=slots),  # loaded: the memory warpgroup
        plgpu.Barrier(num_arrivals=2, num_barriers=slots),  # consumed: both compute warpgroups
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # tiles: [0] free to overwrite, [1] written
        plgpu.Barrier(num_arrivals=2),  # done
        plgpu.SMEM((BLOCK_H, BLOCK_K), dtype, transforms=tiled),  # p of a step
        plgpu.SMEM((BLOCK_H, BLOCK_K), dtype, transforms=tiled),  # ds of a step (scaled)
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      **{_OUT_KWARG: jax.ShapeDtypeStruct((n_rows, hp, dp), dtype)},
      grid=(n_chunks, chunk_rows, hp // BLOCK_H),
      grid_names=("nc", "n", "hg"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )


@functools.partial(jax.jit, static_argnames=("scale", "reduce_width"))
def sparse_attention_gpu_bwd(q_BSHD, kv_BTD, indices_BSK, dout_BSHD, lse_BSH, delta_BSH, *, scale: float,
                             reduce_width: int = REDUCE_WIDTH):
  """(dq [B,S,H,D] in q's dtype, dkv [B,T,D] float32) by the Mosaic GPU kernel; the vjp's backward (vjp.py).

  lse: the forward's (natural log, sink included); delta = Σ_d dO·O − dlse. Matmul operands are 16-bit (as in
  the forward), accumulation float32."""
  B, S, H, D = q_BSHD.shape
  T, K = kv_BTD.shape[1], indices_BSK.shape[-1]
  dtype = q_BSHD.dtype if q_BSHD.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
  hp, dp, kp = _round_up(H, BLOCK_H), _round_up(D, 2 * CHUNK), _round_up(max(K, 1), BLOCK_K)
  n, n_kv = B * S, B * T
  q, do = _query_rows(q_BSHD, dtype, hp, dp), _query_rows(dout_BSHD, dtype, hp, dp)
  kv, idx = _flat_kv(kv_BTD, indices_BSK, dtype, dp, kp, BLOCK_K)
  # padded heads: lse huge (p = 0), delta 0; finite, so no inf - inf
  lse = jnp.pad(lse_BSH.astype(jnp.float32), ((0, 0), (0, 0), (0, hp - H)), constant_values=1e30).reshape(n, hp)
  delta = jnp.pad(delta_BSH.astype(jnp.float32), ((0, 0), (0, 0), (0, hp - H))).reshape(n, hp)
  dkv_ref = jax.new_ref(jnp.zeros((n_kv + BLOCK_K, dp), jnp.float32))
  dq = _backward_call(n, n_kv, hp, dp, kp, dtype, scale, reduce_width)(q, do, kv, idx, lse, delta, dkv_ref)
  dkv = jax.freeze(dkv_ref)[:n_kv].reshape(B, T, dp)[:, :, :D]
  return dq.reshape(B, S, hp, dp)[:, :, :H, :D].astype(q_BSHD.dtype), dkv
