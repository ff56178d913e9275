"""Mosaic GPU (Hopper) kernel for gather-sparse attention: the forward pass.

One CTA per (query, group of 64 heads): the heads are the M = 64 rows of every WGMMA, so all heads of a query
share each gathered key, as on the TPU kernel. 2 + MEM_WGS warpgroups:

  * MEM_WGS = 2 memory warpgroups gather, per step, the BLOCK_K = 64 kv rows the query selected into a
    shared-memory slot (rows j = w mod MEM_WGS from warpgroup w). Hopper has no gather TMA, so each row goes as
    D/64 bulk copies of 64 columns (one 128-byte swizzle atom row each), straight into the swizzled layout WGMMA
    reads; SLOTS slots let the gather of step i+1 overlap the math of step i. Issuing those copies is the
    bound today (H200: 51.5 TFLOP/s with one memory warpgroup, 75.8 with two; experiments/results/kernels.md);
  * two compute warpgroups each own half of the D output columns (a [64, D/2] float32 accumulator; the whole
    [64, D] would not fit in one warpgroup's registers). Each computes the full score tile S = Q·Kᵀ (D/64
    WGMMAs of K = 64), the online softmax with the sink folded in as an extra logit of value 0 (m starts at the
    sink, l at 1), and P·V for its columns.

Shared memory: Q [D/64, 64, 64] + SLOTS × K [D/64, 64, 64] in bf16 (64 + 128 KiB at D = 512). The gathered slot is
viewed two ways (a RefUnion): without tiling for the one-row copies, with (8, 64) tiling for WGMMA; at 64 columns
the two layouts coincide byte for byte. Index -1 fetches row 0 and is masked to -inf.
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
_MAX_GRID_ROWS = 65535
_LOG2E = math.log2(math.e)
# plgpu.kernel's output argument: `out_type` in jax 0.11, `out_shape` before.
_OUT_KWARG = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"


def _round_up(x, m):
  return -(-x // m) * m


def _forward_call(n_rows, n_kv, hp, dp, kp, dtype, scale, interpret, block_k, slots, mem_wgs):
  nch = dp // CHUNK  # column chunks of D
  half = nch // 2  # chunks of the output owned by each compute warpgroup
  nblk = kp // block_k
  BLOCK_K, SLOTS = block_k, slots  # noqa: N806
  mem_regs = 40 if mem_wgs == 1 else 24
  compute_regs = min(232, (65536 - mem_wgs * 128 * mem_regs) // 256 // 8 * 8)
  tiled = (plgpu.TilingTransform((8, CHUNK)), plgpu.SwizzleTransform(128))
  swizzled = (plgpu.SwizzleTransform(128),)

  def body(q_ref, kv_ref, idx_ref, sink_ref, out_ref, lse_ref, q_smem, slots, idx_smem, sink_smem, lse_smem,
           q_bar, loaded, consumed, done):
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

      def gather_loop(first, stride):
        @pl.loop(0, nblk)
        def _step(blk):
          slot = lax.rem(blk, SLOTS)

          @pl.when(blk >= SLOTS)
          def _():
            plgpu.barrier_wait(consumed.at[slot])

          issue_rows(blk, slot, first, stride)

      gather_loop(wg - 2, mem_wgs)  # memory warpgroup w issues rows j = w (mod mem_wgs)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(compute_regs, action="increase")
      plgpu.barrier_wait(q_bar)
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      m_i = plgpu.load(sink_smem, layout=row_layout) * _LOG2E  # the sink: a logit whose value is 0
      l_i = jnp.ones_like(m_i)
      acc = plgpu.layout_cast(jnp.zeros((BLOCK_H, half * CHUNK), jnp.float32), plgpu.Layout.WGMMA)

      def step(blk, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(blk, SLOTS)
        plgpu.barrier_wait(loaded.at[slot])

        def qk(acc_ref):
          for c in range(nch):
            plgpu.wgmma(acc_ref, q_smem.at[c], k_tiled.at[slot, c].transpose((1, 0)))
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((BLOCK_H, BLOCK_K), jnp.float32))
        valid = plgpu.load(idx_smem.at[blk], layout=plgpu.Layout.WGMMA.reduce(0)) >= 0
        s = jnp.where(lax.broadcast_in_dim(valid, s.shape, [1]), s * (scale * _LOG2E), -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)

        def pv(acc_ref):
          for c in range(half):
            plgpu.wgmma(acc_ref.at[:, pl.ds(c * CHUNK, CHUNK)], p16, k_tiled.at[slot, wg * half + c])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(consumed.at[slot])
        return acc, m_new, l_i

      acc, m_i, l_i = lax.fori_loop(0, nblk, step, (acc, m_i, l_i))
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

  def entry(q_ref, kv_ref, idx_ref, sink_ref, out_ref, lse_ref):
    slot_bytes = (SLOTS, nch, BLOCK_K, CHUNK)
    slots = plgpu.RefUnion(plgpu.SMEM(slot_bytes, dtype, transforms=tiled),
                           plgpu.SMEM(slot_bytes, dtype, transforms=swizzled))
    pl.run_scoped(
        lambda q_smem, slots, idx_smem, sink_smem, lse_smem, q_bar, loaded, consumed, done: body(
            q_ref, kv_ref, idx_ref, sink_ref, out_ref, lse_ref, q_smem, slots, idx_smem, sink_smem, lse_smem,
            q_bar, loaded, consumed, done),
        plgpu.SMEM((nch, BLOCK_H, CHUNK), dtype, transforms=tiled),
        slots,
        plgpu.SMEM((nblk, BLOCK_K), jnp.int32),  # 2-D: a bulk copy moves <= 256 per dim
        plgpu.SMEM((BLOCK_H,), jnp.float32),
        plgpu.SMEM((BLOCK_H,), jnp.float32),
        plgpu.Barrier(num_arrivals=nch + 2),
        plgpu.Barrier(num_arrivals=BLOCK_K * nch, num_barriers=SLOTS),
        plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS),
        plgpu.Barrier(num_arrivals=2),
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


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k", "slots", "mem_wgs"))
def sparse_attention_gpu(q_BSHD, kv_BTD, sink_H, indices_BSK, *, scale: float, interpret=None,
                         block_k: int = BLOCK_K, slots: int = SLOTS, mem_wgs: int = MEM_WGS):
  """(out [B,S,H,D] in q's dtype, lse [B,S,H] float32) by the Mosaic GPU kernel; pads H, D and K internally.

  `interpret`: None on an NVIDIA GPU; an `plgpu.InterpretGPUParams` to run the kernel in GPU interpret mode."""
  B, S, H, D = q_BSHD.shape
  T, K = kv_BTD.shape[1], indices_BSK.shape[-1]
  dtype = q_BSHD.dtype
  if dtype not in (jnp.bfloat16, jnp.float16):  # WGMMA operands are 16-bit here
    dtype = jnp.bfloat16
  hp, dp, kp = _round_up(H, BLOCK_H), _round_up(D, 2 * CHUNK), _round_up(max(K, 1), block_k)
  q = jnp.pad(q_BSHD.astype(dtype), ((0, 0), (0, 0), (0, hp - H), (0, dp - D))).reshape(B * S, hp, dp)
  kv = jnp.pad(kv_BTD.astype(dtype), ((0, 0), (0, 0), (0, dp - D))).reshape(B * T, dp)
  idx = jnp.where(indices_BSK >= 0, indices_BSK + (jnp.arange(B) * T)[:, None, None], -1).astype(jnp.int32)
  idx = jnp.pad(idx, ((0, 0), (0, 0), (0, kp - K)), constant_values=-1).reshape(B * S, kp // block_k, block_k)
  sink = jnp.pad(sink_H.astype(jnp.float32), (0, hp - H), constant_values=-1e30)  # finite: no inf - inf in padded rows
  # CUDA caps the grid's second and third dimensions at 65535: launch ceil(B·S / 65535) equal row chunks
  n = B * S
  n_chunks = -(-n // _MAX_GRID_ROWS)
  rows = -(-n // n_chunks)
  q = jnp.pad(q, ((0, n_chunks * rows - n), (0, 0), (0, 0)))
  idx = jnp.pad(idx, ((0, n_chunks * rows - n), (0, 0), (0, 0)), constant_values=-1)
  call = _forward_call(rows, B * T, hp, dp, kp, dtype, scale, interpret, block_k, slots, mem_wgs)
  parts = [call(q[i * rows:(i + 1) * rows], kv, idx[i * rows:(i + 1) * rows], sink) for i in range(n_chunks)]
  out = jnp.concatenate([p[0] for p in parts])[:n] if n_chunks > 1 else parts[0][0]
  lse = jnp.concatenate([p[1] for p in parts])[:n] if n_chunks > 1 else parts[0][1]
  out = out.reshape(B, S, hp, dp)[:, :, :H, :D].astype(q_BSHD.dtype)
  return out, lse.reshape(B, S, hp)[:, :, :H]
