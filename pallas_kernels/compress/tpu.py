"""Mosaic TPU kernel of blockwise compression (forward): gated pooling, RMSNorm, RoPE, and optionally the FP8
cache codes, in one pass over the projected rows.

Grid (batch, group of G slots). A step's rows come from HBM by DMA into VMEM: one DMA per buffer when the G
slots are consecutive blocks (the common case: end[g] = end[0] + g·m), else one DMA per slot (packed documents).
With the CSA overlap the block's own rows are fetched through channels [c:] and the previous block's through
[:c], so every input byte is read once. The next step's DMAs start before this step computes (two buffers).
kv / score are viewed as [B, S, coff, c/128, 128] so a run of rows is whole tiles at any row offset (see
sparse_attention.tpu._rows). Empty slots and missing overlaps fetch clamped real rows and are masked.

The pooled vector, norm and RoPE are float32 [G, c] lane-dense math; RoPE rotates the tail lanes [T0, c) that
hold the rope dims (T0 = the 128-aligned start) with two lane rolls and per-lane cos / ±sin tables from XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.compress import reference
from pallas_kernels.sparse_attention.tpu import _on_tpu_or_interpret, _pad, _round_up

ROWS_PER_STEP = 256  # raw rows per grid step (per buffer): G = max(8, ROWS_PER_STEP // m) slots
VMEM_LIMIT = 48 * 2**20  # of 64 MiB per v5p core, 128 MiB per v6e core
_F32 = jnp.float32


def slots_per_step(m: int) -> int:
  return max(8, (ROWS_PER_STEP // m) // 8 * 8)


def _fp8_codes(x_GL, lane_L, nope: int):
  """(e4m3 codes [G, L] int32 of the NoPE lanes, ue8m0 scale bytes [G, 128] int32 in lanes 0..nope/64-1)."""
  G = x_GL.shape[0]
  blk_L = lax.div(lane_L, jnp.int32(reference.FP8_BLOCK))  # lanes are >= 0 (jnp // lowers through sign)
  ax = jnp.abs(x_GL)
  scale_GL = jnp.ones_like(x_GL)
  scale_bytes = jnp.zeros((G, 128), jnp.int32)
  lane128 = lax.broadcasted_iota(jnp.int32, (1, 128), 1)
  for k in range(nope // reference.FP8_BLOCK):
    amax_G1 = jnp.maximum(jnp.max(jnp.where(blk_L == k, ax, 0.0), axis=1, keepdims=True),
                          reference.FP8_AMAX_FLOOR)
    s_G1 = reference.pow2_scale(amax_G1)
    scale_GL = jnp.where(blk_L == k, s_G1, scale_GL)
    byte_G1 = (lax.bitcast_convert_type(s_G1, jnp.int32) >> 23) & 0xFF
    scale_bytes = jnp.where(lane128 == k, byte_G1, scale_bytes)
  v = jnp.clip(x_GL / scale_GL, -reference.FP8_MAX, reference.FP8_MAX)
  return reference.e4m3_code(v), scale_bytes


def _kernel(end_s, end_n, flags_ref, ape_ref, w_ref, cos_ref, sin_ref, kv_hbm, sc_hbm, *rest,
            m, c, t0, eps, overlap, out_dtype, fp8_nope, n_groups):
  n_out = 3 if fp8_nope else 1
  outs, (bufs, sems) = rest[:n_out], (rest[n_out:-1], rest[-1])
  b, i = pl.program_id(0), pl.program_id(1)
  G = flags_ref.shape[1]
  S = kv_hbm.shape[1]
  cur_h = 1 if overlap else 0
  # (buffer, semaphore column, channel half, row shift): the block's own rows; with overlap the m rows before.
  parts = [(bufs[0], 0, cur_h, 0), (bufs[1], 1, cur_h, 0)]
  if overlap:
    parts += [(bufs[2], 2, 0, m), (bufs[3], 3, 0, m)]
  srcs = [kv_hbm, sc_hbm, kv_hbm, sc_hbm]

  def start(end_ref, p):
    e0 = end_ref[0, 0, 0, 0]
    run = lax.fori_loop(1, G, lambda g, ok: ok * (end_ref[0, 0, 0, g] == e0 + g * m).astype(jnp.int32),
                        (e0 >= 0).astype(jnp.int32))
    for buf, k, h, shift in parts:
      first = e0 - m + 1 - shift
      src = srcs[k].at[b]

      whole = (run == 1) & (first >= 0)

      @pl.when(whole)
      def _():
        pltpu.make_async_copy(src.at[pl.ds(first, G * m), h], buf.at[p], sems.at[p, k]).start()

      @pl.when(jnp.logical_not(whole))
      def _():
        def one(g, carry):
          row = jnp.clip(end_ref[0, 0, 0, g] - m + 1 - shift, 0, S - m)
          pltpu.make_async_copy(src.at[pl.ds(row, m), h], buf.at[p, pl.ds(g * m, m)], sems.at[p, k]).start()
          return carry
        lax.fori_loop(0, G, one, 0)

  p = i % 2

  @pl.when(i == 0)
  def _():
    start(end_s, p)

  @pl.when(i + 1 < n_groups)  # a constant, not pl.num_programs: interpret mode can reuse another grid's trace
  def _():
    start(end_n, 1 - p)

  for buf, k, h, _ in parts:
    pltpu.make_async_copy(buf.at[p], buf.at[p], sems.at[p, k]).wait()  # the bytes of a whole buffer

  L = w_ref.shape[1]
  valid_G1 = flags_ref[0, :, 0:1] > 0
  has_prev_G1 = flags_ref[0, :, 1:2] > 0

  def rows(buf, r):
    return buf[p, pl.ds(r, G, stride=m)].reshape(G, L).astype(_F32)

  def logits(r):
    cur = rows(bufs[1], r) + ape_ref[cur_h, pl.ds(r, 1), :]
    if not overlap:
      return cur, None
    return cur, jnp.where(has_prev_G1, rows(bufs[3], r) + ape_ref[0, pl.ds(r, 1), :], -jnp.inf)

  def loop(body, init):
    if m <= 8:
      carry = init
      for r in range(m):
        carry = body(r, carry)
      return carry
    return lax.fori_loop(0, m, body, init)

  def max_body(r, mx):
    cur, prev = logits(r)
    mx = jnp.maximum(mx, cur)
    return mx if prev is None else jnp.maximum(mx, prev)

  mx = loop(max_body, jnp.full((G, L), -jnp.inf, _F32))

  def sum_body(r, carry):
    s, acc = carry
    cur, prev = logits(r)
    e = jnp.exp(cur - mx)
    s, acc = s + e, acc + e * rows(bufs[0], r)
    if prev is not None:
      e = jnp.exp(prev - mx)  # 0 where there is no previous block
      s, acc = s + e, acc + jnp.where(has_prev_G1, e * rows(bufs[2], r), 0.0)
    return s, acc

  zeros = jnp.zeros((G, L), _F32)
  s, acc = loop(sum_body, (zeros, zeros))
  y = (acc / s).astype(out_dtype).astype(_F32)
  lane_L = lax.broadcasted_iota(jnp.int32, (1, L), 1)
  ms = jnp.sum(jnp.where(lane_L < c, y * y, 0.0), axis=1, keepdims=True) / c
  y = (y * lax.rsqrt(ms + eps) * w_ref[...]).astype(out_dtype).astype(_F32)
  tail = y[:, t0:]
  W = L - t0
  even = (lax.broadcasted_iota(jnp.int32, (1, W), 1) % 2) == 0
  partner = jnp.where(even, pltpu.roll(tail, W - 1, 1), pltpu.roll(tail, 1, 1))  # x[j+1] even j, x[j-1] odd
  rotated = (tail * cos_ref[0] + partner * sin_ref[0]).astype(out_dtype).astype(_F32)
  entry = jnp.concatenate([y[:, :t0], rotated], axis=1) if t0 else rotated
  entry = jnp.where(valid_G1, entry, 0.0)
  outs[0][0] = entry.astype(outs[0].dtype)
  if fp8_nope:
    codes, scale_bytes = _fp8_codes(entry, lane_L, fp8_nope)
    outs[1][0] = codes
    outs[2][0] = scale_bytes


def _call(end, flags, ape, w, cos, sin, kv, sc, *, m, c, t0, eps, overlap, out_dtype, fp8_nope, G,
          interpret):
  B, Np = end.shape
  L = w.shape[1]
  coff, Rh = kv.shape[2], kv.shape[3]
  n = Np // G
  # end as [B, n, 1, G] (an SMEM block's last two dims must be whole): this step's slots, and the next step's.
  smem = lambda nxt: pl.BlockSpec((1, 1, 1, G), (lambda b, i: (b, jnp.minimum(i + 1, n - 1), 0, 0)) if nxt else
                                  (lambda b, i: (b, i, 0, 0)), memory_space=pltpu.SMEM)
  row_spec = lambda width: pl.BlockSpec((1, G, width), lambda b, i: (b, i, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  out_specs = [row_spec(L)]
  out_shape = [jax.ShapeDtypeStruct((B, Np, L), out_dtype)]
  if fp8_nope:
    out_specs += [row_spec(L), row_spec(128)]
    out_shape += [jax.ShapeDtypeStruct((B, Np, L), jnp.int32), jax.ShapeDtypeStruct((B, Np, 128), jnp.int32)]
  n_buf = 4 if overlap else 2
  kernel = functools.partial(_kernel, m=m, c=c, t0=t0, eps=eps, overlap=overlap, out_dtype=out_dtype,
                             fp8_nope=fp8_nope, n_groups=n)
  return pl.pallas_call(
      kernel,
      grid=(B, n),
      in_specs=[smem(False), smem(True), row_spec(2),
                pl.BlockSpec(ape.shape, lambda b, i: (0, 0, 0)), pl.BlockSpec(w.shape, lambda b, i: (0, 0)),
                row_spec(L - t0), row_spec(L - t0), any_spec, any_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((2, G * m, Rh, 128), kv.dtype) for _ in range(n_buf)]
      + [pltpu.SemaphoreType.DMA((2, n_buf))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=VMEM_LIMIT),
      interpret=interpret, name="compress_fwd")(end.reshape(B, n, 1, G), end.reshape(B, n, 1, G), flags, ape, w, cos, sin, kv, sc)


def rope_lanes(positions_BN, spec: reference.Spec, c: int, t0: int, L: int):
  """Per-lane (cos, ±sin) [B, N, L - t0] for lanes [t0, L): out = x·cos + partner·sin (partner = the pair's
  other lane); 1 / 0 outside the rope dims [c - r, c)."""
  cos, sin = reference.rope_tables(positions_BN, spec.rope_freqs)  # [B, N, r/2]
  r = spec.rope_dim
  lane = jnp.arange(t0, L)
  is_rope = (lane >= c - r) & (lane < c)
  k = jnp.clip((lane - (c - r)) // 2, 0, r // 2 - 1)
  sign = jnp.where(lane % 2 == 0, -1.0, 1.0)
  return (jnp.where(is_rope, cos[..., k], 1.0).astype(_F32),
          jnp.where(is_rope, sign * sin[..., k], 0.0).astype(_F32))


def compress_tpu(kv_BSC, score_BSC, ape_MC, weight_C, end_BN, has_prev_BN, positions_BN, spec, *,
                 fp8: bool = False):
  """Entries [B, N, c] in spec.out_dtype (as compress_reference), or with fp8 the packed uint8 rows."""
  B, S, C = kv_BSC.shape
  c = weight_C.shape[0]
  N = end_BN.shape[1]
  m, coff = spec.ratio, (2 if spec.overlap else 1)
  out_dtype = jnp.dtype(spec.out_dtype)
  if N == 0:
    out = jnp.zeros((B, 0, c), out_dtype)
    return reference.pack_fp8(out, spec.rope_dim) if fp8 else out
  L = _round_up(c, 128)
  t0 = (c - spec.rope_dim) // 128 * 128
  G = slots_per_step(m)
  Np = _round_up(N, G)
  Sp = max(S, m)

  def rows(x):  # [B, S, coff·c] -> [B, Sp, coff, L/128, 128]
    x = _pad(x.reshape(B, S, coff, c), (B, Sp, coff, L))
    return x.reshape(B, Sp, coff, L // 128, 128)

  end = _pad(end_BN.astype(jnp.int32), (B, Np), -1)
  prev = _pad((has_prev_BN & (end_BN >= 0)).astype(jnp.int32), (B, Np))
  flags = jnp.stack([(end >= 0).astype(jnp.int32), prev], axis=-1)
  ape = _pad(ape_MC.astype(_F32).reshape(m, coff, c).swapaxes(0, 1), (coff, m, L))
  w = _pad(weight_C.astype(_F32)[None], (1, L))
  cos, sin = rope_lanes(_pad(positions_BN, (B, Np)), spec, c, t0, L)
  nope = c - spec.rope_dim if fp8 else 0
  if fp8 and (nope <= 0 or nope % reference.FP8_BLOCK):
    raise ValueError(f"fp8 entries need NoPE dims (c {c} - rope {spec.rope_dim}) in multiples of "
                     f"{reference.FP8_BLOCK}")
  build = lambda interpret: functools.partial(
      _call, m=m, c=c, t0=t0, eps=spec.eps, overlap=spec.overlap, out_dtype=out_dtype, fp8_nope=nope, G=G,
      interpret=interpret)
  outs = _on_tpu_or_interpret(build, end, flags, ape, w, cos, sin, rows(kv_BSC), rows(score_BSC))
  entries = outs[0][:, :N, :c]
  if not fp8:
    return entries
  codes, scales = outs[1][:, :N, :nope].astype(jnp.uint8), outs[2][:, :N, :nope // reference.FP8_BLOCK]
  rope = lax.bitcast_convert_type(entries[..., nope:].astype(jnp.bfloat16), jnp.uint8).reshape(B, N, -1)
  return jnp.concatenate([codes, rope, scales.astype(jnp.uint8), jnp.zeros((B, N, 1), jnp.uint8)], axis=-1)
