"""Mosaic TPU kernel of the compress backward: d(kv), d(score), d(ape), d(norm_weight) from d(entries).

Grid (batch, block of RB rows of kv / score). A step owns rows [t0, t0 + RB) of dkv / dscore in the natural
[B, S, coff·c] layout (regular output blocks: every row written once, zeros where no slot reads it) and recomputes
the slots that touch those rows: the slots ending in [t0, t0 + RB + span - 1) (span = m, or 2m with the overlap),
at most GB of them because slots' blocks are disjoint (as block_slots builds them; overlapping slots are not
supported here). XLA sorts the slots by end and gathers, per row block, those slots' ends, flags, d(entries) and
RoPE lane tables ([N, c]-sized arrays, not rows), and whether they are consecutive blocks.

The step reads rows [t0 - H, t0 + RB + H) (H >= span - 1, a multiple of the row tile) as three regular blocks (two
halos beside the main block: no manual DMA, no copy of the inputs) into a frame [lane tiles, rows, 128], then
recomputes the gate softmax, pooling and RMSNorm of its slots and backpropagates through RoPE (its transpose:
x·cos + partner(x·sin)), the norm, and the softmax pooling (dkv = p·dP, dscore = p·(kv - P)·dP) into a float32
frame of cotangents; the casts of the forward to the entries' dtype are mirrored on the cotangents, as in the
reference's VJP. A row of the overlap feeds two slots (channels [:c] the next block, [c:] its own): both land.

* Consecutive blocks (one document across the step, the common case): slot g's rows are frame rows p0 + g·m + r,
  read with strided loads (32-bit: straight from the frame; 16-bit: after rolling it by p0) and the cotangents
  stored the same way (every row and lane tile written at most once).
* Otherwise: each span is rolled into tpu.py's compact layout, backpropagated there in place, rolled back and
  added into the frame.

d(ape) and d(norm_weight) accumulate over a batch row's steps (each slot counted by the block holding its end) in
resident output blocks; XLA sums them over batch rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.compress import reference
from pallas_kernels.compress import tpu as fwd
from pallas_kernels.sparse_attention.tpu import _on_tpu_or_interpret, _pad, _round_up

ROWS_PER_STEP = 256  # dkv rows per grid step (at least 4 halos)
_F32 = jnp.float32


def block_rows(geo: fwd.Geometry):
  """(H halo rows, RB rows per step, GB slots per step, Xr frame rows)."""
  H = _round_up(max(geo.span - 1, 1), geo.T)
  RB = max(_round_up(ROWS_PER_STEP, H), 4 * H)
  GB = _round_up(-(-(RB + geo.span - 1) // geo.m), 8)
  # The frame holds the halos and block, and the strided rows of GB consecutive slots from offset <= H + m.
  return H, RB, GB, _round_up(max(2 * H + RB, H + geo.m + GB * geo.m + geo.m_off), geo.T)


def _set_rows(q_ref, j, r, part, value, geo, G):
  """The inverse of tpu.slot_rows on the compact layout: writes [G, 128] as row r of every slot's own (1) /
  previous (0) block."""
  q_ref[fwd.ape_tile(j, part, geo), pl.ds((geo.m_off if part == 1 else 0) + r, G, stride=geo.S1), :] = value


def _kernel(run_ref, end_ref, flags_ref, ape_ref, w_ref, cos_ref, sin_ref, g_ref, kv_lo, kv_mid, kv_hi, sc_lo,
            sc_mid, sc_hi, dkv_ref, dsc_ref, dape_ref, dw_ref, kv_x, sc_x, kv_q, sc_q, kv_y, sc_y, *, geo, t0, H,
            RB):
  j = pl.program_id(1)
  GB = flags_ref.shape[2]
  L = w_ref.shape[1]
  m, T, W1, S1, K = geo.m, geo.T, geo.W1, geo.S1, geo.K
  X, Xr = 2 * H + RB, kv_x.shape[1]
  out_dtype = jnp.dtype(geo.out_dtype)
  rnd = lambda a: a.astype(out_dtype).astype(_F32)  # a cast to the entries' dtype and back
  lanes = lambda k: pl.ds(k * 128, 128)

  @pl.when(j == 0)
  def _():
    dape_ref[...] = jnp.zeros(dape_ref.shape, _F32)
    dw_ref[...] = jnp.zeros(dw_ref.shape, _F32)
    if Xr > X:  # rows past the halo: read by slots that touch nothing (masked); zeros, never rewritten
      for x in (kv_x, sc_x):
        x[:, pl.ds(X, Xr - X), :] = jnp.zeros((K, Xr - X, 128), x.dtype)

  # The frame: rows [t0 - H, t0 + RB + H) by lane tile.
  for x, parts in ((kv_x, (kv_lo, kv_mid, kv_hi)), (sc_x, (sc_lo, sc_mid, sc_hi))):
    for k in range(K):
      x[k, pl.ds(0, H), :] = parts[0][0, :, lanes(k)]
      x[k, pl.ds(H, RB), :] = parts[1][0, :, lanes(k)]
      x[k, pl.ds(H + RB, H), :] = parts[2][0, :, lanes(k)]
  kv_y[...] = jnp.zeros(kv_y.shape, _F32)
  sc_y[...] = jnp.zeros(sc_y.shape, _F32)
  frame0 = j * RB - H  # the row of frame row 0

  valid_G1 = flags_ref[0, 0, :, 0:1] > 0
  has_prev_G1 = flags_ref[0, 0, :, 1:2] > 0
  owner_G1 = flags_ref[0, 0, :, 2:3] > 0
  cat = lambda xs: jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]

  def backprop(kv_rows, sc_rows, store):
    """Recomputes the slots' forward from their rows, and store(jt, r, part, dkv, dscore) each row's cotangents."""
    stats = [fwd.softmax_pool(kv_rows, sc_rows, ape_ref, has_prev_G1, jt, geo, GB) for jt in range(geo.nt)]
    x = rnd(cat([s[2] for s in stats]))  # the norm's input
    inv = fwd.rms_stats(x, geo)
    xh = x * inv
    # RoPE's transpose on the tail lanes, then the cast of its float32 input to the entries' dtype.
    g = jnp.where(valid_G1, g_ref[0, 0], 0.0)
    tail = g[:, t0:]
    Wt = tail.shape[1]
    even = (lax.broadcasted_iota(jnp.int32, (1, Wt), 1) % 2) == 0
    gs = tail * sin_ref[0, 0]
    tail = rnd(tail * cos_ref[0, 0] + jnp.where(even, pltpu.roll(gs, Wt - 1, 1), pltpu.roll(gs, 1, 1)))
    dn = cat([g[:, :t0], tail]) if t0 else tail  # cotangent of the norm's output
    dw_ref[0] += jnp.sum(jnp.where(owner_G1, dn * xh, 0.0), axis=0, keepdims=True)
    dyh = dn * w_ref[...]
    lane_L = lax.broadcasted_iota(jnp.int32, (1, L), 1)
    dot = jnp.sum(jnp.where(lane_L < geo.c, dyh * x, 0.0), axis=1, keepdims=True) / geo.c
    dP = rnd(inv * dyh - x * (inv * inv * inv) * dot)  # cotangent of the pooled vector

    for jt in range(geo.nt):
      mx, s, P = stats[jt]
      rs = 1.0 / s
      dP_t = dP[:, jt * 128:(jt + 1) * 128]

      def body(r, carry, jt=jt, mx=mx, rs=rs, P=P, dP_t=dP_t):
        cur, prev = fwd.logits(sc_rows, ape_ref, has_prev_G1, jt, r, geo, GB)
        for part, z in ((1, cur), (0, prev)):
          if z is None:
            continue
          p = jnp.exp(z - mx) * rs  # 0 where there is no previous block
          dz = p * (fwd.slot_rows(kv_rows, jt, r, part, geo, GB) - P) * dP_t
          store(jt, r, part, p * dP_t, dz)
          dape_ref[0, fwd.ape_tile(jt, part, geo), pl.ds(r, 1), :] += jnp.sum(jnp.where(owner_G1, dz, 0.0),
                                                                               axis=0, keepdims=True)
        return carry

      fwd.loop(m, body, 0)

  @pl.when(run_ref[0, 0, 0, 0] > 0)
  def _():  # the touching slots are consecutive blocks: strided rows of the frame, cotangents stored in place
    p0 = end_ref[0, 0, 0, 0] - geo.span + 1 - frame0
    rows = []
    for x, q in ((kv_x, kv_q), (sc_x, sc_q)):
      if jnp.dtype(x.dtype).itemsize == 4:
        rows.append((x, p0, p0 + geo.m_off, m))
      else:  # packed rows take static strided loads only
        amount = lax.rem(Xr - p0, Xr)
        for k in range(K):
          q[k, pl.ds(0, Xr), :] = pltpu.roll(x[k].astype(_F32), amount, 0)
        rows.append((q, 0, geo.m_off, m))

    def store(jt, r, part, dx, dz):
      tile = fwd.ape_tile(jt, part, geo)
      at = pl.ds(p0 + (geo.m_off if part == 1 else 0) + r, GB, stride=m)
      kv_y[tile, at, :] = dx
      sc_y[tile, at, :] = dz

    backprop(rows[0], rows[1], store)

  @pl.when(run_ref[0, 0, 0, 0] == 0)
  def _():  # any slots: each span rolled into the compact layout, cotangents rolled back and added
    def window(g):
      lo = jnp.clip(end_ref[0, 0, 0, g] - geo.span + 1 - frame0, 0, X - geo.span)
      row0 = jnp.minimum(lax.bitwise_and(lo, jnp.int32(-T)), X - W1)
      return row0, lo - row0

    def gather(g, carry):
      row0, shift = window(g)
      fwd.roll_rows(kv_x, row0, shift, kv_q, g, geo, tiled=True)
      fwd.roll_rows(sc_x, row0, shift, sc_q, g, geo, tiled=True)
      return carry

    lax.fori_loop(0, GB, gather, 0)
    kv_rows, sc_rows = fwd.compact_rows(kv_q, geo), fwd.compact_rows(sc_q, geo)

    def store(jt, r, part, dx, dz):
      _set_rows(kv_q, jt, r, part, dx, geo, GB)
      _set_rows(sc_q, jt, r, part, dz, geo, GB)

    backprop(kv_rows, sc_rows, store)
    # Per slot and lane tile: the span's rows of its half (the rest zero), rolled into place and added.
    row_S = lax.broadcasted_iota(jnp.int32, (S1, 128), 0)
    keep = [((row_S < m) if geo.overlap and k < geo.nt else (row_S >= geo.m_off) & (row_S < geo.span))
            for k in range(K)]

    def place(g, carry):
      row0, shift = window(g)
      row0 = pl.multiple_of(row0, T)
      src = pl.multiple_of(g * S1, 8)
      for q, y in ((kv_q, kv_y), (sc_q, sc_y)):
        for k in range(K):
          v = jnp.where(keep[k], q[k, pl.ds(src, S1), :], 0.0)
          if W1 > S1:
            v = jnp.concatenate([v, jnp.zeros((W1 - S1, 128), _F32)], axis=0)
          y[k, pl.ds(row0, W1), :] += pltpu.roll(v, shift, 0)  # the span stays inside W1 rows
      return carry

    lax.fori_loop(0, GB, place, 0)

  for k in range(K):
    dkv_ref[0, :, lanes(k)] = kv_y[k, pl.ds(H, RB), :].astype(dkv_ref.dtype)
    dsc_ref[0, :, lanes(k)] = sc_y[k, pl.ds(H, RB), :].astype(dsc_ref.dtype)


def _call(run, ends, flags, ape, w, cos, sin, g, kv, sc, *, geo, t0, H, RB, Xr, interpret):
  B, nR, _, GB = ends.shape
  Sp, Cp = kv.shape[1], kv.shape[2]
  L = w.shape[1]
  per_block = lambda *tail: pl.BlockSpec((1, 1) + tail, lambda b, j: (b, j) + (0,) * len(tail))
  smem = lambda n: pl.BlockSpec((1, 1, 1, n), lambda b, j: (b, j, 0, 0), memory_space=pltpu.SMEM)
  hr = RB // H
  lo = pl.BlockSpec((1, H, Cp), lambda b, j: (b, jnp.maximum(j * hr - 1, 0), 0))
  mid = pl.BlockSpec((1, RB, Cp), lambda b, j: (b, j, 0))
  hi = pl.BlockSpec((1, H, Cp), lambda b, j: (b, jnp.minimum((j + 1) * hr, Sp // H - 1), 0))
  q_rows = lambda x: max(GB * geo.S1, Xr if jnp.dtype(x.dtype).itemsize != 4 else 0)
  kernel = functools.partial(_kernel, geo=geo, t0=t0, H=H, RB=RB)
  return pl.pallas_call(
      kernel,
      grid=(B, nR),
      in_specs=[smem(1), smem(GB), per_block(GB, 3), pl.BlockSpec(ape.shape, lambda b, j: (0, 0, 0)),
                pl.BlockSpec(w.shape, lambda b, j: (0, 0)), per_block(GB, L - t0), per_block(GB, L - t0),
                per_block(GB, L), lo, mid, hi, lo, mid, hi],
      out_specs=[mid, mid, pl.BlockSpec((1,) + ape.shape, lambda b, j: (b, 0, 0, 0)),
                 pl.BlockSpec((1, 1, L), lambda b, j: (b, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct(kv.shape, kv.dtype), jax.ShapeDtypeStruct(sc.shape, sc.dtype),
                 jax.ShapeDtypeStruct((B,) + ape.shape, _F32), jax.ShapeDtypeStruct((B, 1, L), _F32)],
      scratch_shapes=[pltpu.VMEM((geo.K, Xr, 128), x.dtype) for x in (kv, sc)]
      + [pltpu.VMEM((geo.K, q_rows(x), 128), _F32) for x in (kv, sc)]
      + [pltpu.VMEM((geo.K, Xr, 128), _F32) for _ in range(2)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=fwd.VMEM_LIMIT),
      interpret=interpret, name="compress_bwd")(run, ends, flags, ape, w, cos, sin, g, kv, kv, kv, sc, sc, sc)


def slots_per_block(end_BN, nR: int, RB: int, GB: int, span: int):
  """(slot index [B, nR, GB], touches [B, nR, GB], owns [B, nR, GB]): the slots whose span meets rows
  [j·RB, (j+1)·RB) of each block j (by end, at most GB), and which of them end in it."""
  B, N = end_BN.shape
  key = jnp.where(end_BN >= 0, end_BN, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, axis=1, stable=True).astype(jnp.int32)
  starts = jnp.arange(nR, dtype=jnp.int32) * RB
  first = jax.vmap(lambda k: jnp.searchsorted(k, starts, side="left"))(jnp.take_along_axis(key, order, axis=1))
  idx = first[:, :, None].astype(jnp.int32) + jnp.arange(GB, dtype=jnp.int32)
  slot = jnp.take_along_axis(order, jnp.minimum(idx, N - 1).reshape(B, -1), axis=1).reshape(B, nR, GB)
  e = jnp.take_along_axis(end_BN, slot.reshape(B, -1), axis=1).reshape(B, nR, GB)
  t0 = starts[None, :, None]
  touches = (idx < N) & (e >= 0) & (e <= t0 + RB + span - 2)
  return slot, touches, touches & (e < t0 + RB)


def compress_tpu_bwd(kv_BSC, score_BSC, ape_MC, weight_C, end_BN, has_prev_BN, positions_BN, d_entry_BNC, spec):
  """(d kv, d score, d ape, d norm_weight) of compress_reference's entries, given their cotangent."""
  B, S, C = kv_BSC.shape
  c = weight_C.shape[0]
  N = end_BN.shape[1]
  if N == 0:
    return (jnp.zeros_like(kv_BSC), jnp.zeros_like(score_BSC), jnp.zeros_like(ape_MC), jnp.zeros_like(weight_C))
  geo = fwd.geometry(kv_BSC, score_BSC, c, spec)
  L, coff = geo.L, (2 if geo.overlap else 1)
  t0 = (c - spec.rope_dim) // 128 * 128
  H, RB, GB, Xr = block_rows(geo)
  Sp = _round_up(S, RB)
  nR = Sp // RB
  end = end_BN.astype(jnp.int32)
  slot, touches, owns = slots_per_block(end, nR, RB, GB, geo.span)
  take = lambda a: jax.vmap(lambda x, i: x[i])(a, slot)  # [B, N, ...] -> [B, nR, GB, ...]
  e = jnp.where(touches, take(end), -1)
  steps = e[:, :, :1] + geo.m * jnp.arange(GB, dtype=jnp.int32)
  first_ok = e[:, :, 0] <= jnp.arange(nR, dtype=jnp.int32) * RB + geo.m + geo.span - 2  # frame offset <= H + m
  run = touches[:, :, 0] & first_ok & jnp.all(~touches | (e == steps), axis=2)
  ends = e[:, :, None, :]
  flags = jnp.stack([touches, touches & take(has_prev_BN), owns], axis=-1).astype(jnp.int32)
  g = jnp.where(touches[..., None], _pad(take(d_entry_BNC).astype(_F32), (B, nR, GB, L)), 0.0)
  cos, sin = fwd.rope_lanes(take(positions_BN.astype(jnp.int32)), spec, c, t0, L)
  w = _pad(weight_C.astype(_F32)[None], (1, L))
  build = lambda interpret: functools.partial(_call, geo=geo, t0=t0, H=H, RB=RB, Xr=Xr, interpret=interpret)
  dkv, dsc, dape, dw = _on_tpu_or_interpret(build, run.astype(jnp.int32)[:, :, None, None], ends, flags, fwd.ape_lanes(ape_MC, geo), w, cos, sin, g,
                                            fwd.natural_rows(kv_BSC, geo, Sp), fwd.natural_rows(score_BSC, geo, Sp))

  def rows_back(x):
    if x.shape == (B, S, C):
      return x
    return x.reshape(B, Sp, coff, L)[:, :S, :, :c].reshape(B, S, C)

  dape = jnp.sum(dape, axis=0).swapaxes(0, 1).reshape(geo.m, coff, L)[:, :, :c].reshape(geo.m, C)
  return (rows_back(dkv), rows_back(dsc), dape.astype(ape_MC.dtype),
          jnp.sum(dw, axis=(0, 1))[:c].astype(weight_C.dtype))
