"""Mosaic TPU kernels for gather-sparse attention: forward (online softmax with the sink) and backward (dq, and
per-(query, entry) dkv contributions that XLA scatter-adds).

Grid (batch, block of BQ = 8 queries, chunk of KC = 128 index columns). Each step gathers, for each of its
queries, the KC kv rows that query selected into VMEM: one DMA per row from HBM, or a single DMA when the chunk
is a contiguous run (windows, HCA's visible entries), none when the chunk is all -1 (the step then skips that
query). All BQ gathers start before the first query's compute, so later ones overlap it. The query's [H, D] tile
then meets the gathered [KC, D] keys on the MXU (H is the M dimension: every head shares the keys). Indices reach
the scalar core (DMA addresses) through an SMEM block and the vector unit (the -1 mask) through a VMEM block of
the same array; -1 inside a live chunk fetches row 0 and is masked out. kv is viewed as [B, T, D/128, 128] so a
single row can be fetched (see _rows). VMEM per step: see VMEM_LIMIT.

TPUs have no atomics, so the backward writes each query's [KC, D] dkv contribution (g = scale·dsᵀq + pᵀdO) to
HBM and XLA scatter-adds them (XLA:TPU sorts the indices and runs a sorted segment scatter); queries go in chunks
so that buffer stays under DKV_CHUNK_BYTES. That combine writes and re-reads 4·K·D bytes per query (the kernel
gathers 2·K·D) and sorts S·K indices: an in-kernel segment sum is the next step if it dominates on hardware.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BLOCK_Q = 8  # queries per grid step (the sublane count: blocks of [BQ, H] and [BQ, KC] stay tile-aligned)
BLOCK_K = 128  # index columns per grid step (one lane width)
# Measured by AOT compiles (v5p, v6e): Flash (H=64) forward 5 MiB, backward 9.4 MiB; Pro (H=128) 8.5 and 13.3 MiB.
VMEM_LIMIT = 32 * 2**20  # of 64 MiB per v5p core, 128 MiB per v6e core
DKV_CHUNK_BYTES = 1 << 30  # HBM for one chunk's dkv contributions [B, chunk, K, D] float32
# Off TPU: NaN-filled fresh buffers (outputs included), so a block the kernel leaves unwritten shows up.
INTERPRET = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan")


def _round_up(x, m):
  return -(-x // m) * m


def block_sizes(S, K, D):
  """(BQ, KC, padded S, padded K, padded D) for the kernels (from BLOCK_Q and BLOCK_K, read at trace time)."""
  kc = BLOCK_K if K > BLOCK_K else _round_up(K, 8)
  return BLOCK_Q, kc, _round_up(S, BLOCK_Q), _round_up(K, kc), _round_up(D, 128)


_compile_for_tpu = contextvars.ContextVar("compile_for_tpu", default=False)


@contextlib.contextmanager
def compile_for_tpu():
  """Traces the kernels for Mosaic even when the default backend is not a TPU (ahead-of-time compiles for a TPU
  topology from a CPU host). Use a fresh jitted function inside: jit caches do not see this switch."""
  token = _compile_for_tpu.set(True)
  try:
    yield
  finally:
    _compile_for_tpu.reset(token)


def _on_tpu_or_interpret(build, *args):
  """build(interpret)(*args): Mosaic on a TPU backend (or under compile_for_tpu), else TPU interpret mode.

  (lax.platform_dependent cannot choose here: the interpreter's callbacks are ordered effects that a cond
  lowered for TPU rejects.)"""
  mosaic = _compile_for_tpu.get() or jax.default_backend() == "tpu"
  return build(False if mosaic else INTERPRET)(*args)


# ---------------------------------------------------------------------------------------------------------------
# Gather, and small layout helpers shared by both kernels.
def _start_gather(kv_TRL, idx_smem, r, buf_KRL, sem):
  """Starts the DMAs of query r's selected rows of kv_TRL (HBM) into buf_KRL [KC, D/128, 128]; all signal sem.

  Returns `live`, 0 when all of the chunk's indices are -1: then nothing is fetched and the caller skips it."""
  kc = buf_KRL.shape[0]
  first = idx_smem[0, r, 0]

  def scan(j, carry):
    run, live = carry
    t = idx_smem[0, r, j]
    return run * (t == first + j).astype(jnp.int32), jnp.maximum(live, (t >= 0).astype(jnp.int32))

  run, live = lax.fori_loop(0, kc, scan, ((first >= 0).astype(jnp.int32), jnp.int32(0)))

  @pl.when(run == 1)
  def _():
    pltpu.make_async_copy(kv_TRL.at[pl.ds(first, kc)], buf_KRL, sem).start()

  @pl.when((run == 0) & (live == 1))
  def _():
    def row(j, carry):
      t = jnp.maximum(idx_smem[0, r, j], 0)  # -1: any real row; the mask drops it
      pltpu.make_async_copy(kv_TRL.at[pl.ds(t, 1)], buf_KRL.at[pl.ds(j, 1)], sem).start()
      return carry

    lax.fori_loop(0, kc, row, 0)

  return live


def _start_block_gathers(kv_hbm, idx_smem, buf, sem):
  """(kv_TRL, live): this grid step's batch row of kv (HBM), and `_start_gather` for each of the block's query
  rows (into buf[r], signalling sem[r])."""
  kv_TRL = kv_hbm.at[pl.program_id(0)]
  return kv_TRL, [_start_gather(kv_TRL, idx_smem, r, buf.at[r], sem.at[r]) for r in range(buf.shape[0])]


def _wait_gather(kv_TRL, buf_KRL, sem):
  """Waits for the bytes of a whole buffer (KC row copies or one run copy); returns the keys [KC, D]."""
  kc, R, L = buf_KRL.shape
  pltpu.make_async_copy(kv_TRL.at[pl.ds(0, kc)], buf_KRL, sem).wait()
  return buf_KRL[...].reshape(kc, R * L)


def _eye(n):
  return lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _col_to_row(x_H1, eye_HH):
  return jnp.sum(jnp.where(eye_HH, x_H1, 0.0), axis=0, keepdims=True)


def _row_to_col(x_1H, eye_HH):
  return jnp.sum(jnp.where(eye_HH, x_1H, 0.0), axis=1, keepdims=True)


def _dot(a, b, contract):
  """float32-accumulated matmul; the precision is explicit (full for float32 operands, native for bf16) so a
  global jax_default_matmul_precision cannot ask Mosaic for an fp32 contraction of bf16 operands."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _nn(a, b):
  """a [M, K] · b [K, N]."""
  return _dot(a, b, ((1,), (0,)))


def _nt(a, b):
  """a [M, D] · b [N, D]ᵀ."""
  return _dot(a, b, ((1,), (1,)))


def _tn(a, b):
  """a [K, M]ᵀ · b [K, N]."""
  return _dot(a, b, ((0,), (0,)))


# ---------------------------------------------------------------------------------------------------------------
# Forward.
def _fwd_kernel(idx_smem, idx_ref, q_ref, sink_ref, kv_hbm, out_ref, lse_ref, buf, sem, m_scr, l_scr, acc_scr,
                *, scale, n_k):
  # (n_k, the grid's chunk count, comes in as a constant rather than pl.num_programs: TPU interpret mode can
  # reuse a kernel traced for one grid in a later call with another.)
  k, bq, H = pl.program_id(2), q_ref.shape[1], q_ref.shape[2]
  kv_TRL, live = _start_block_gathers(kv_hbm, idx_smem, buf, sem)

  @pl.when(k == 0)
  def _():
    for r in range(bq):  # the sink is the first "key": m = sink, l = exp(sink - m) = 1, and it has no value
      m_scr[r] = sink_ref[...]
      l_scr[r] = jnp.ones((H, 1), jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def attend(r):
    keys_KD = _wait_gather(kv_TRL, buf.at[r], sem.at[r])
    s_HK = _nt(q_ref[0, r], keys_KD) * scale
    s_HK = jnp.where(idx_ref[0, r:r + 1, :] >= 0, s_HK, -jnp.inf)
    m_prev_H1 = m_scr[r]
    m_new_H1 = jnp.maximum(m_prev_H1, jnp.max(s_HK, axis=1, keepdims=True))
    alpha_H1 = jnp.exp(m_prev_H1 - m_new_H1)
    p_HK = jnp.exp(s_HK - m_new_H1)
    l_scr[r] = alpha_H1 * l_scr[r] + jnp.sum(p_HK, axis=1, keepdims=True)
    acc_scr[r] = alpha_H1 * acc_scr[r] + _nn(p_HK.astype(keys_KD.dtype), keys_KD)
    m_scr[r] = m_new_H1

  for r in range(bq):
    pl.when(live[r] == 1)(functools.partial(attend, r))  # an all -1 chunk changes nothing

  @pl.when(k == n_k - 1)
  def _():
    eye_HH = _eye(H)
    for r in range(bq):
      l_H1 = l_scr[r]
      out_ref[0, r] = (acc_scr[r] / l_H1).astype(out_ref.dtype)
      lse_ref[0, r:r + 1, :] = _col_to_row(m_scr[r] + jnp.log(l_H1), eye_HH)


def _fwd_call(idx, q, sink_H1, kv, *, scale, bq, kc, interpret):
  B, Sp, H, Dp = q.shape
  Kp = idx.shape[2]
  idx_spec = (1, bq, kc), lambda b, i, k: (b, i, k)
  q_spec = pl.BlockSpec((1, bq, H, Dp), lambda b, i, k: (b, i, 0, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, n_k=Kp // kc),
      grid=(B, Sp // bq, Kp // kc),
      in_specs=[pl.BlockSpec(*idx_spec, memory_space=pltpu.SMEM), pl.BlockSpec(*idx_spec), q_spec,
                pl.BlockSpec((H, 1), lambda b, i, k: (0, 0)), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=[q_spec, pl.BlockSpec((1, bq, H), lambda b, i, k: (b, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Sp, H), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, kc) + kv.shape[2:], kv.dtype), pltpu.SemaphoreType.DMA((bq,)),
                      pltpu.VMEM((bq, H, 1), jnp.float32), pltpu.VMEM((bq, H, 1), jnp.float32),
                      pltpu.VMEM((bq, H, Dp), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=VMEM_LIMIT),
      interpret=interpret, name="sparse_attention_fwd")(idx, idx, q, sink_H1, kv)


def _pad(x, sizes, value=0):
  pads = [(0, n - d) for d, n in zip(x.shape, sizes)]
  return jnp.pad(x, pads, constant_values=value) if any(p for _, p in pads) else x


def _rows(kv_BTD, Dp):
  """kv [B, T, D] -> [B, T, Dp/128, 128]: a row is then a run of whole (R, 128) tiles, which a DMA can fetch at
  any t (a [T, D] array is tiled by 8 rows in HBM, and DMA offsets along a tiled axis must be tile-aligned)."""
  B, T, _ = kv_BTD.shape
  return _pad(kv_BTD, (B, T, Dp)).reshape(B, T, Dp // 128, 128)


def sparse_attention_tpu(q_BSHD, kv_BTD, sink_H, indices_BSK, *, scale: float):
  """Forward: (out [B,S,H,D] in q's dtype, lse [B,S,H] float32)."""
  B, S, H, D = q_BSHD.shape
  bq, kc, Sp, Kp, Dp = block_sizes(S, indices_BSK.shape[2], D)
  q = _pad(q_BSHD, (B, Sp, H, Dp))
  kv = _rows(kv_BTD.astype(q.dtype), Dp)
  idx = _pad(indices_BSK.astype(jnp.int32), (B, Sp, Kp), -1)
  sink_H1 = sink_H.astype(jnp.float32)[:, None]
  build = lambda interpret: functools.partial(_fwd_call, scale=scale, bq=bq, kc=kc, interpret=interpret)
  out, lse = _on_tpu_or_interpret(build, idx, q, sink_H1, kv)
  return out[:, :S, :, :D], lse[:, :S]


# ---------------------------------------------------------------------------------------------------------------
# Backward.
def _bwd_kernel(off_ref, idx_smem, idx_ref, q_ref, do_ref, lse_ref, dlt_ref, kv_hbm, dq_in, dq_ref, g_ref, buf,
                sem, dq_scr, *, scale, n_k):
  del off_ref, dq_in  # the block offset is used by the index maps; dq_in is dq_ref's buffer (aliased)
  k, bq, H = pl.program_id(2), q_ref.shape[1], q_ref.shape[2]
  kv_TRL, live = _start_block_gathers(kv_hbm, idx_smem, buf, sem)

  @pl.when(k == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  eye_HH = _eye(H)

  def backprop(r):
    keys_KD = _wait_gather(kv_TRL, buf.at[r], sem.at[r])
    q_HD, do_HD = q_ref[0, r], do_ref[0, r]
    s_HK = _nt(q_HD, keys_KD) * scale
    p_HK = jnp.where(idx_ref[0, r:r + 1, :] >= 0, jnp.exp(s_HK - _row_to_col(lse_ref[0, r:r + 1, :], eye_HH)), 0.0)
    dp_HK = _nt(do_HD, keys_KD)
    ds_HK = p_HK * (dp_HK - _row_to_col(dlt_ref[0, r:r + 1, :], eye_HH))
    dq_scr[r] += scale * _nn(ds_HK.astype(keys_KD.dtype), keys_KD)
    g_ref[0, r] = scale * _tn(ds_HK.astype(q_HD.dtype), q_HD) + _tn(p_HK.astype(do_HD.dtype), do_HD)

  def skip(r):  # all -1: no dq, and zero contributions (dropped by the scatter, but written all the same)
    g_ref[0, r] = jnp.zeros(g_ref.shape[2:], g_ref.dtype)

  for r in range(bq):
    pl.when(live[r] == 1)(functools.partial(backprop, r))
    pl.when(live[r] == 0)(functools.partial(skip, r))

  @pl.when(k == n_k - 1)
  def _():
    dq_ref[0] = dq_scr[...].astype(dq_ref.dtype)


def _bwd_call(off, idx, q, do, lse, dlt, kv, dq, *, scale, bq, kc, n_blocks, interpret):
  """One chunk of n_blocks query blocks from block off[0]: dq (in place) and g [B, n_blocks·BQ, Kp, Dp]."""
  B, _, H, Dp = q.shape
  Kp = idx.shape[2]
  idx_spec = (1, bq, kc), lambda b, i, k, off: (b, off[0] + i, k)
  q_spec = pl.BlockSpec((1, bq, H, Dp), lambda b, i, k, off: (b, off[0] + i, 0, 0))
  row_spec = pl.BlockSpec((1, bq, H), lambda b, i, k, off: (b, off[0] + i, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(B, n_blocks, Kp // kc),
      in_specs=[pl.BlockSpec(*idx_spec, memory_space=pltpu.SMEM), pl.BlockSpec(*idx_spec), q_spec, q_spec,
                row_spec, row_spec, any_spec, any_spec],
      out_specs=[q_spec, pl.BlockSpec((1, bq, kc, Dp), lambda b, i, k, off: (b, i, k, 0))],
      scratch_shapes=[pltpu.VMEM((bq, kc) + kv.shape[2:], kv.dtype), pltpu.SemaphoreType.DMA((bq,)),
                      pltpu.VMEM((bq, H, Dp), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_bwd_kernel, scale=scale, n_k=Kp // kc), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(dq.shape, dq.dtype),
                 jax.ShapeDtypeStruct((B, n_blocks * bq, Kp, Dp), jnp.float32)],
      input_output_aliases={8: 0},  # dq (counting the scalar-prefetch operand)
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=VMEM_LIMIT),
      interpret=interpret, name="sparse_attention_bwd")(off, idx, idx, q, do, lse, dlt, kv, dq)


def sparse_attention_tpu_bwd(q_BSHD, kv_BTD, indices_BSK, dout_BSHD, lse_BSH, delta_BSH, *, scale: float,
                             dkv_chunk_bytes: int | None = None):
  """(dq [B,S,H,D] in q's dtype, dkv [B,T,D] float32) given delta = Σ_d dO·O - dlse (see vjp.py)."""
  B, S, H, D = q_BSHD.shape
  T = kv_BTD.shape[1]
  bq, kc, Sp, Kp, Dp = block_sizes(S, indices_BSK.shape[2], D)
  q = _pad(q_BSHD, (B, Sp, H, Dp))
  do = _pad(dout_BSHD.astype(q.dtype), (B, Sp, H, Dp))
  kv = _rows(kv_BTD.astype(q.dtype), Dp)
  idx = _pad(indices_BSK.astype(jnp.int32), (B, Sp, Kp), -1)
  lse = _pad(lse_BSH.astype(jnp.float32), (B, Sp, H))
  dlt = _pad(delta_BSH.astype(jnp.float32), (B, Sp, H))
  n_q_blocks = Sp // bq
  n_blocks = max(1, min(n_q_blocks, (dkv_chunk_bytes or DKV_CHUNK_BYTES) // (B * bq * Kp * Dp * 4)))
  n_chunks = -(-n_q_blocks // n_blocks)
  build = lambda interpret: functools.partial(_bwd_call, scale=scale, bq=bq, kc=kc, n_blocks=n_blocks,
                                              interpret=interpret)
  b_B11 = jnp.arange(B)[:, None, None]

  def chunk(c, carry):
    dq, dkv = carry
    start = c * n_blocks
    off = jnp.minimum(start, n_q_blocks - n_blocks)  # the last chunk overlaps the one before instead of padding
    dq, g = _on_tpu_or_interpret(build, off[None].astype(jnp.int32), idx, q, do, lse, dlt, kv, dq)
    idx_c = lax.dynamic_slice_in_dim(idx, off * bq, n_blocks * bq, axis=1)
    pos = off * bq + jnp.arange(n_blocks * bq)[None, :, None]
    idx_c = jnp.where((idx_c < 0) | (pos < start * bq), T, idx_c)  # T = dropped: -1, or done by the last chunk
    return dq, dkv.at[b_B11, idx_c].add(g, mode="drop")

  # NaN, not zeros: every dq block is written, and one that is not must not pass for a zero gradient.
  dq0 = jnp.full(q.shape, jnp.nan, q.dtype)
  dq, dkv = lax.fori_loop(0, n_chunks, chunk, (dq0, jnp.zeros((B, T, Dp), jnp.float32)))
  return dq[:, :S, :, :D], dkv[..., :D]
