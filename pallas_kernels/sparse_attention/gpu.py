"""Mosaic GPU (Hopper) kernel for gather-sparse attention: the forward pass.

One CTA per (query, group of 64 heads): the heads are the M = 64 rows of every WGMMA, so all heads of a query
share each gathered key, as on the TPU kernel. 2 + MEM_WGS warpgroups:

  * MEM_WGS = 2 memory warpgroups gather, per step, the BLOCK_K = 64 kv rows the query selected into a
    shared-memory slot; SLOTS slots let the gather of step i+1 overlap the math of step i. Hopper has no gather
    TMA. gather="cp_async" (default): every memory thread issues 16-byte cp.async copies straight into the
    128-byte-swizzled layout WGMMA reads (an inline Mosaic GPU routine), waits for its own copies, fences them
    for the async proxy and arrives. gather="tma": one bulk copy per 128-byte atom row, each issued by a single
    thread with its own barrier arrival (5,120 copies per query at K = 640): 3.3-4.4x slower on the H200, the
    issue rate being its bound (experiments/results/kernels.md);
  * two compute warpgroups each own half of the D output columns (a [64, D/2] float32 accumulator; the whole
    [64, D] would not fit in one warpgroup's registers) and run the online softmax with the sink folded in as an
    extra logit of value 0 (m starts at the sink, l at 1). split="none": each computes the full score
    tile S = Q·Kᵀ of the step (D/64 WGMMAs of K = 64), so the score work is done twice. split="rows" (default,
    6-14% faster on the H200): each scores
    half of the step's rows, the two exchange their row maxima and write their half of P into one shared tile
    (an inline routine: Pallas stores whole swizzle atoms only), then each multiplies the whole P by its columns
    of V; a third less tensor work, but the warpgroups now run in lockstep (two exchanges per step), so one's
    softmax no longer hides behind the other's WGMMAs.

Shared memory: Q [D/64, 64, 64] + SLOTS × K [D/64, 64, 64] + P [64, 64] in bf16 (64 + 128 + 8 KiB at D = 512). The
gathered slot is viewed two ways (a RefUnion): without tiling for the one-row TMA copies, with (8, 64) tiling for
WGMMA; at 64 columns the two layouts coincide byte for byte. Index -1 fetches row 0 and is masked to -inf.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_H = 64  # heads per CTA: the WGMMA M dimension
BLOCK_K = 64  # selected keys per pipeline step
CHUNK = 64  # columns per swizzle atom (128 bytes of bf16)
SLOTS = 2  # gather slots in flight
MEM_WGS = 2  # warpgroups issuing the gather copies
SPLIT = "rows"  # each compute warpgroup scores half of a step's rows, P is exchanged through SMEM ("none": both score all)
GATHER = "cp_async"  # how rows are gathered: 16-byte cp.async by every memory thread, or "tma" (one bulk copy
                     # per 128-byte atom row, issued by one thread each)
_MAX_GRID_ROWS = 65535
_LOG2E = math.log2(math.e)
# plgpu.kernel's output argument: `out_type` in jax 0.11, `out_shape` before.
_OUT_KWARG = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"


def _round_up(x, m):
  return -(-x // m) * m


def _query_rows(x_BSHD, dtype, hp: int, dp: int):
  """x (q or dO) as the kernels take it: [B·S, hp, dp] in `dtype`, heads and dims zero-padded."""
  B, S, H, D = x_BSHD.shape
  return jnp.pad(x_BSHD.astype(dtype), ((0, 0), (0, 0), (0, hp - H), (0, dp - D))).reshape(B * S, hp, dp)


def _flat_kv(kv_BTD, indices_BSK, dtype, dp: int, kp: int, block_k: int):
  """(kv as [B·T, dp] rows in `dtype`; indices into those rows, -1 kept, as [B·S, kp / block_k, block_k])."""
  B, T, D = kv_BTD.shape
  S, K = indices_BSK.shape[1:]
  kv = jnp.pad(kv_BTD.astype(dtype), ((0, 0), (0, 0), (0, dp - D))).reshape(B * T, dp)
  idx = jnp.where(indices_BSK >= 0, indices_BSK + (jnp.arange(B) * T)[:, None, None], -1).astype(jnp.int32)
  idx = jnp.pad(idx, ((0, 0), (0, 0), (0, kp - K)), constant_values=-1).reshape(B * S, kp // block_k, block_k)
  return kv, idx


def _store_column_half(half_k: int):
  """An inline Mosaic GPU routine run by both compute warpgroups: store warpgroup w's [64, half_k] block of P (16-bit,
  WGMMA register layout) into columns [w·half_k, (w+1)·half_k) of the [64, 2·half_k] P tile in the (8, 64)-tiled,
  128-byte-swizzled layout WGMMA reads (Pallas stores whole swizzle atoms only; these are half atoms)."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import arith, llvm  # noqa: PLC0415
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType((plgpu.TilingTransform((8, CHUNK)),
                                                                    plgpu.SwizzleTransform(128)))))
  def store(_, p, p_smem):
    i8, i32 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(32)

    def c(v):
      return arith.constant(i32, v)

    col0 = arith.muli(arith.divui(mgpu.utils.thread_idx(), c(128)), c(half_k))
    base = mgpu.utils.memref_ptr(p_smem)
    for (row, col), reg in zip(p.layout.thread_idxs(p.shape), p.registers.flat, strict=True):
      row, col = arith.index_cast(i32, row), arith.addi(arith.index_cast(i32, col), col0)
      r8 = arith.remui(row, c(8))
      unit = arith.xori(arith.divui(col, c(8)), r8)  # the 16-byte unit after the swizzle
      byte = arith.addi(arith.addi(arith.muli(arith.divui(row, c(8)), c(1024)), arith.muli(r8, c(128))),
                        arith.addi(arith.muli(unit, c(16)), arith.muli(arith.remui(col, c(8)), c(2))))
      llvm.store(reg, mgpu.utils.getelementptr(base, [byte], i8))
    return ()

  return store


def _cp_async_gather(mem_wgs: int, dp: int, block_k: int):
  """An inline Mosaic GPU routine run by all threads of the memory warpgroups: copy the `block_k` selected kv
  rows (16-bit, `dp` wide) into one slot of the untiled, 128-byte-swizzled [D/64, block_k, 64] layout that the
  WGMMA view reads, as 16-byte `cp.async` copies spread over every thread (Hopper's TMA cannot gather rows).

  Thread t of the memory warpgroups copies units u = t, t + threads, ...: row u // (dp/8), 16-byte column
  u % (dp/8), so a warp reads 512 contiguous bytes of one row. Each thread waits for its own copies and fences
  them for the async proxy (WGMMA) before it returns; the caller then arrives on the slot's barrier."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415  (Mosaic GPU builders, only when lowering for a GPU)
  from jax._src.lib.mlir.dialects import arith, llvm, memref, nvvm  # noqa: PLC0415
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415

  threads = mem_wgs * 128
  units = dp * 2 // 16  # 16-byte units per row
  if (block_k * units) % threads:
    raise ValueError(f"{block_k} rows of {units} units do not split over {threads} threads")

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType((plgpu.SwizzleTransform(128),))))
  def copy_block(_, kv_gmem, idx_smem, dst_smem):
    i8, i32, i64 = (ir.IntegerType.get_signless(b) for b in (8, 32, 64))
    index = ir.IndexType.get()

    def c(v, ty=i32):
      return arith.constant(ty, v)

    t = arith.subi(mgpu.utils.thread_idx(), c(256))  # the memory warpgroups follow the two compute ones
    src_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu.utils.memref_ptr(kv_gmem))
    dst_base = mgpu.utils.memref_ptr(dst_smem)
    for i in range(block_k * units // threads):
      unit = arith.addi(t, c(i * threads))
      row, col = arith.divui(unit, c(units)), arith.remui(unit, c(units))
      kv_row = arith.maxsi(memref.load(idx_smem, [arith.index_cast(index, row)]), c(0))  # -1: row 0, masked
      src = arith.addi(arith.muli(arith.extui(i64, kv_row), c(dp * 2, i64)), arith.extui(i64, arith.muli(col, c(16))))
      # column unit `col` of `row` sits in swizzle-atom line (col // 8) * block_k + row, at 16-byte position
      # (col % 8) xor (row % 8)
      line = arith.addi(arith.muli(arith.divui(col, c(8)), c(block_k)), row)
      pos = arith.xori(arith.remui(col, c(8)), arith.remui(row, c(8)))
      dst = arith.addi(arith.muli(line, c(128)), arith.muli(pos, c(16)))
      nvvm.cp_async_shared_global(mgpu.utils.getelementptr(dst_base, [dst], i8),
                                  mgpu.utils.getelementptr(src_base, [src], i8), 16,
                                  nvvm.LoadCacheModifierKind.CG)
    nvvm.cp_async_commit_group()
    nvvm.cp_async_wait_group(0)
    nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)
    return ()

  return copy_block


def _forward_call(n_rows, n_kv, hp, dp, kp, dtype, scale, interpret, block_k, slots, mem_wgs, gather, split):
  nch = dp // CHUNK  # column chunks of D
  half = nch // 2  # chunks of the output owned by each compute warpgroup
  nblk = kp // block_k
  BLOCK_K, SLOTS = block_k, slots  # noqa: N806
  mem_regs = 40 if mem_wgs == 1 else 24  # the copy loops need few registers; the rest go to the math
  compute_regs = min(232, (65536 - mem_wgs * 128 * mem_regs) // 256 // 8 * 8)
  tiled = (plgpu.TilingTransform((8, CHUNK)), plgpu.SwizzleTransform(128))
  swizzled = (plgpu.SwizzleTransform(128),)

  def body(q_ref, kv_ref, idx_ref, sink_ref, out_ref, lse_ref, q_smem, slots, idx_smem, sink_smem, lse_smem,
           q_bar, loaded, consumed, done, p_smem, xch_smem, xch_bar):
    k_tiled, k_rows = slots
    n = lax.axis_index("n")
    hg = lax.axis_index("hg")
    wg = lax.axis_index("wg")
    heads = pl.ds(hg * BLOCK_H, BLOCK_H)

    @pl.when(wg == 2)
    def _inputs():
      for c in range(nch):
        plgpu.copy_gmem_to_smem(q_ref.at[n, heads, pl.ds(c * CHUNK, CHUNK)], q_smem.at[c], q_bar)
      plgpu.copy_gmem_to_smem(idx_ref.at[n], idx_smem, q_bar)
      plgpu.copy_gmem_to_smem(sink_ref.at[heads], sink_smem, q_bar)

    @pl.when(wg >= 2)
    def _memory():
      plgpu.set_max_registers(mem_regs, action="decrease")
      plgpu.barrier_wait(q_bar)

      def issue_rows(blk, slot, first, stride):  # copies of rows j = first, first + stride, ... of step blk
        @pl.loop(0, BLOCK_K // stride)
        def _row(r):
          j = r * stride + first
          row = jnp.maximum(idx_smem[blk, j], 0)
          for c in range(nch):
            plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(row, 1), pl.ds(c * CHUNK, CHUNK)],
                                    k_rows.at[slot, c, pl.ds(j, 1)], loaded.at[slot])

      copy_block = _cp_async_gather(mem_wgs, dp, block_k) if gather == "cp_async" else None
      first_row = wg - 2 if gather == "tma" else None  # memory warpgroup w issues rows j = w (mod mem_wgs)

      @pl.loop(0, nblk)
      def _step(blk):
        slot = lax.rem(blk, SLOTS)

        @pl.when(blk >= SLOTS)
        def _():
          plgpu.barrier_wait(consumed.at[slot])

        if gather == "tma":
          issue_rows(blk, slot, first_row, mem_wgs)
        else:
          copy_block(kv_ref, idx_smem.at[blk], k_rows.at[slot])  # returns once this thread's copies landed
          plgpu.barrier_arrive(loaded.at[slot])

    def finish(acc, m_i, l_i):  # out = acc / l into q_smem (free once both warpgroups are done), then to HBM
      acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
      plgpu.barrier_arrive(done)
      plgpu.barrier_wait(done)  # both warpgroups are past their last read of q_smem
      for c in range(half):
        q_smem[wg * half + c] = acc[:, c * CHUNK:(c + 1) * CHUNK].astype(dtype)

      @pl.when(wg == 0)
      def _():
        lse_smem[...] = (m_i + jnp.log2(l_i)) / _LOG2E

      plgpu.commit_smem()
      for c in range(half):
        cc = wg * half + c
        plgpu.copy_smem_to_gmem(q_smem.at[cc], out_ref.at[n, heads, pl.ds(cc * CHUNK, CHUNK)])

      @pl.when(wg == 0)
      def _():
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[n, heads])

      plgpu.wait_smem_to_gmem(0)

    def _compute():
      plgpu.set_max_registers(compute_regs, action="increase")
      plgpu.barrier_wait(q_bar)
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      rows_k = BLOCK_K // 2 if split == "rows" else BLOCK_K  # the rows this warpgroup scores per step
      mine = pl.ds(pl.multiple_of(wg * rows_k, rows_k) if split == "rows" else 0, rows_k)
      m_i = plgpu.load(sink_smem, (), layout=row_layout) * _LOG2E  # the sink: a logit whose value is 0
      # "rows": each warpgroup sums its own rows' weights, so each holds half of the sink's; the halves are added
      l_i = jnp.full_like(m_i, 0.5 if split == "rows" else 1.0)
      acc = plgpu.layout_cast(jnp.zeros((BLOCK_H, half * CHUNK), jnp.float32), plgpu.Layout.WGMMA)

      def exchange(x, k):  # (this warpgroup's row vector, the other's): one round through shared memory
        xch_smem[k, wg] = x
        plgpu.barrier_arrive(xch_bar.at[k])
        plgpu.barrier_wait(xch_bar.at[k])
        return plgpu.load(xch_smem.at[k, 1 - wg], (), layout=row_layout)

      def step(blk, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(blk, SLOTS)
        plgpu.barrier_wait(loaded.at[slot])

        def qk(acc_ref):
          for c in range(nch):
            plgpu.wgmma(acc_ref, q_smem.at[c], k_tiled.at[slot, c, mine].transpose((1, 0)))
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((BLOCK_H, rows_k), jnp.float32))
        valid = plgpu.load(idx_smem.at[blk, mine], (), layout=plgpu.Layout.WGMMA.reduce(0)) >= 0
        s = jnp.where(lax.broadcast_in_dim(valid, s.shape, [1]), s * (scale * _LOG2E), -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        if split == "rows":
          m_new = jnp.maximum(m_new, exchange(m_new, 0))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p_op = p.astype(dtype)  # the A operand of P·V: in registers; "rows": both halves, from p_smem
        if split == "rows":
          _store_column_half(rows_k)(p_op, p_smem)
          plgpu.commit_smem()
          plgpu.barrier_arrive(xch_bar.at[1])
          plgpu.barrier_wait(xch_bar.at[1])
          p_op = p_smem

        def pv(acc_ref):
          for c in range(half):
            plgpu.wgmma(acc_ref.at[:, pl.ds(c * CHUNK, CHUNK)], p_op, k_tiled.at[slot, wg * half + c])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(consumed.at[slot])
        return acc, m_new, l_i

      acc, m_i, l_i = lax.fori_loop(0, nblk, step, (acc, m_i, l_i))
      if split == "rows":
        l_i = l_i + exchange(l_i, 0)
      finish(acc, m_i, l_i)

    pl.when(wg < 2)(_compute)

  def entry(q_ref, kv_ref, idx_ref, sink_ref, out_ref, lse_ref):
    slot_bytes = (SLOTS, nch, BLOCK_K, CHUNK)
    slots = plgpu.RefUnion(plgpu.SMEM(slot_bytes, dtype, transforms=tiled),
                           plgpu.SMEM(slot_bytes, dtype, transforms=swizzled))
    pl.run_scoped(
        lambda q_smem, slots, idx_smem, sink_smem, lse_smem, q_bar, loaded, consumed, done, p_smem, xch_smem,
        xch_bar: body(q_ref, kv_ref, idx_ref, sink_ref, out_ref, lse_ref, q_smem, slots, idx_smem, sink_smem,
                      lse_smem, q_bar, loaded, consumed, done, p_smem, xch_smem, xch_bar),
        plgpu.SMEM((nch, BLOCK_H, CHUNK), dtype, transforms=tiled),
        slots,
        plgpu.SMEM((nblk, BLOCK_K), jnp.int32),  # 2-D: a bulk copy moves <= 256 per dim
        plgpu.SMEM((BLOCK_H,), jnp.float32),
        plgpu.SMEM((BLOCK_H,), jnp.float32),
        plgpu.Barrier(num_arrivals=nch + 2),
        plgpu.Barrier(num_arrivals=BLOCK_K * nch if gather == "tma" else mem_wgs, num_barriers=SLOTS),
        plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS),
        plgpu.Barrier(num_arrivals=2),
        plgpu.SMEM((BLOCK_H, BLOCK_K), dtype, transforms=tiled),  # P of a step ("rows": each warpgroup's half)
        plgpu.SMEM((2, 2, BLOCK_H), jnp.float32),  # row maxima / sums exchanged between the compute warpgroups
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        collective_axes="wg",
    )

  out_types = (jax.ShapeDtypeStruct((n_rows, hp, dp), dtype), jax.ShapeDtypeStruct((n_rows, hp), jnp.float32))
  return plgpu.kernel(
      entry,
      **{_OUT_KWARG: out_types},
      grid=(n_rows, hp // BLOCK_H),
      grid_names=("n", "hg"),
      num_threads=2 + mem_wgs,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k", "slots", "mem_wgs", "gather",
                                             "split"))
def sparse_attention_gpu(q_BSHD, kv_BTD, sink_H, indices_BSK, *, scale: float, interpret=None,
                         block_k: int = BLOCK_K, slots: int = SLOTS, mem_wgs: int = MEM_WGS,
                         gather: str = GATHER, split: str = SPLIT):
  """(out [B,S,H,D] in q's dtype, lse [B,S,H] float32) by the Mosaic GPU kernel; pads H, D and K internally.

  `interpret`: None on an NVIDIA GPU; an `plgpu.InterpretGPUParams` to run the kernel in GPU interpret mode."""
  B, S, H, D = q_BSHD.shape
  T, K = kv_BTD.shape[1], indices_BSK.shape[-1]
  dtype = q_BSHD.dtype
  if dtype not in (jnp.bfloat16, jnp.float16):  # WGMMA operands are 16-bit here
    dtype = jnp.bfloat16
  hp, dp, kp = _round_up(H, BLOCK_H), _round_up(D, 2 * CHUNK), _round_up(max(K, 1), block_k)
  q = _query_rows(q_BSHD, dtype, hp, dp)
  kv, idx = _flat_kv(kv_BTD, indices_BSK, dtype, dp, kp, block_k)
  sink = jnp.pad(sink_H.astype(jnp.float32), (0, hp - H), constant_values=-1e30)  # finite: no inf - inf in padded rows
  # CUDA caps the grid's second and third dimensions at 65535: launch ceil(B·S / 65535) equal row chunks
  n = B * S
  n_chunks = -(-n // _MAX_GRID_ROWS)
  rows = -(-n // n_chunks)
  q = jnp.pad(q, ((0, n_chunks * rows - n), (0, 0), (0, 0)))
  idx = jnp.pad(idx, ((0, n_chunks * rows - n), (0, 0), (0, 0)), constant_values=-1)
  if gather not in ("cp_async", "tma"):
    raise ValueError(f"gather={gather!r}; expected 'cp_async' or 'tma'")
  if split not in ("rows", "none"):
    raise ValueError(f"split={split!r}; expected 'rows' or 'none'")
  call = _forward_call(rows, B * T, hp, dp, kp, dtype, scale, interpret, block_k, slots, mem_wgs, gather, split)
  parts = [call(q[i * rows:(i + 1) * rows], kv, idx[i * rows:(i + 1) * rows], sink) for i in range(n_chunks)]
  out = jnp.concatenate([p[0] for p in parts])[:n] if n_chunks > 1 else parts[0][0]
  lse = jnp.concatenate([p[1] for p in parts])[:n] if n_chunks > 1 else parts[0][1]
  out = out.reshape(B, S, hp, dp)[:, :, :H, :D].astype(q_BSHD.dtype)
  return out, lse.reshape(B, S, hp)[:, :, :H]
