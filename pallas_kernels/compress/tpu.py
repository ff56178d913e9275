"""Mosaic TPU kernel of blockwise compression (forward): gated pooling, RMSNorm, RoPE, and optionally the FP8
cache codes, in one pass over the projected rows. The backward kernel is tpu_bwd.py; both share the pieces here.

Grid (batch, group of G slots). kv / score stay in their natural [B, S, coff·c] layout (no relayout copy; only
c not a multiple of 128, or S not a multiple of the row tile, pads them): HBM tiles rows by T (8 for 32-bit, 16
for 16-bit), and a DMA may only start on a tile row, so a step fetches T-aligned row windows that cover its rows
and picks the rows inside VMEM. The next step's DMAs start before this step computes (two buffers). A slot's span
is the m rows before its block (with the CSA overlap: read through channels [:c]) and the block's m rows
(channels [c:]); row r of all G slots is one strided load of [G, 128] per lane tile.

* G consecutive blocks (end[g] = end[0] + g·m, the common case): one window of W rows, fetched as one DMA per
  lane tile into [tiles, W, 128] (strided loads need whole-lane rows); slot g's rows start at d + g·m, d < T the
  offset of the first span in the window. 32-bit rows are loaded straight from it (dynamic strided loads); packed
  16-bit rows only take static ones, so the window is first rolled by d into float32.
* Otherwise (packed documents, empty slots): one W1-row window per slot, each span rolled into a compact float32
  layout [tiles, G·S1, 128] (slot g at rows g·S1, S1 = the span rounded up to 8); empty slots and missing
  previous blocks read clamped real rows and are masked.

The pooled vector, norm and RoPE are float32 [G, c] lane-dense math; RoPE rotates the tail lanes [T0, c) that
hold the rope dims (T0 = the 128-aligned start) with two lane rolls and per-lane cos / ±sin tables from XLA.
"""

from __future__ import annotations

import dataclasses
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


def row_tile(*dtypes) -> int:
  """Rows per HBM tile of the widest-packed dtype: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
  return max(8 * 4 // jnp.dtype(d).itemsize for d in dtypes)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static row / lane geometry of one compression (kernel parameters)."""
  m: int  # rows per block
  overlap: bool
  c: int  # entry channels
  T: int  # HBM row tile of the inputs
  eps: float = 0.0
  out_dtype: str = "float32"

  @property
  def m_off(self):  # rows of the previous block in a slot's span
    return self.m if self.overlap else 0

  @property
  def span(self):
    return self.m + self.m_off

  @property
  def S1(self):  # rows per slot in Q
    return _round_up(self.span, 8)

  @property
  def W1(self):  # a T-aligned window that holds any span
    return _round_up(self.span + self.T - 1, self.T)

  @property
  def L(self):
    return _round_up(self.c, 128)

  @property
  def nt(self):  # lane tiles per channel half
    return self.L // 128

  @property
  def K(self):  # lane tiles of an input row
    return (2 if self.overlap else 1) * self.nt


def roll_rows(src_ref, row0, shift, q_ref, g, geo: Geometry, tiled=False):
  """q[k, g·S1 + j] = src[row0 + (shift + j) mod W1, lane tile k] (float32), j < S1, k < K: the slot whose span
  starts `shift` rows into the T-aligned window at row0 of src [rows, K·128] (tiled: [K, rows, 128])."""
  row0 = pl.multiple_of(row0, geo.T)
  amount = lax.rem(geo.W1 - shift, geo.W1)
  dst = pl.multiple_of(g * geo.S1, 8)
  for k in range(geo.K):
    v = src_ref[k, pl.ds(row0, geo.W1), :] if tiled else src_ref[pl.ds(row0, geo.W1), pl.ds(k * 128, 128)]
    q_ref[k, pl.ds(dst, geo.S1), :] = pltpu.roll(v.astype(_F32), amount, 0)[:geo.S1]


def loop(n, body, init):
  """fori_loop over range(n), unrolled when short."""
  if n <= 8:
    carry = init
    for r in range(n):
      carry = body(r, carry)
    return carry
  return lax.fori_loop(0, n, body, init)


def slot_rows(rows, j, r, part, geo: Geometry, G: int):
  """[G, 128] float32: row r of every slot's own block (part 1) or previous block (part 0), lane tile j.

  rows = (ref [tiles, R, 128], first row of slot 0's previous block, of its own block, rows between slots)."""
  ref, p0, p1, stride = rows
  tile = geo.nt + j if geo.overlap and part == 1 else j
  return ref[tile, pl.ds((p1 if part == 1 else p0) + r, G, stride=stride), :].astype(_F32)


def compact_rows(q_ref, geo: Geometry):
  """slot_rows' view of roll_rows' compact layout."""
  return q_ref, 0, geo.m_off, geo.S1


def ape_tile(j, part, geo: Geometry) -> int:
  """Leading index in ape_lanes' layout of lane tile j of the own (1) / previous (0) block's channels."""
  return (geo.nt if geo.overlap and part == 1 else 0) + j


def logits(sc_rows, ape_ref, has_prev_G1, j, r, geo, G):
  """(own, previous or None) gate logits [G, 128] of row r, lane tile j (-inf where there is no previous block)."""
  cur = slot_rows(sc_rows, j, r, 1, geo, G) + ape_ref[ape_tile(j, 1, geo), pl.ds(r, 1), :]
  if not geo.overlap:
    return cur, None
  prev = slot_rows(sc_rows, j, r, 0, geo, G) + ape_ref[ape_tile(j, 0, geo), pl.ds(r, 1), :]
  return cur, jnp.where(has_prev_G1, prev, -jnp.inf)


def softmax_pool(kv_rows, sc_rows, ape_ref, has_prev_G1, j, geo, G):
  """(max, sum, pooled) [G, 128] float32 of lane tile j: the gate softmax over the span and the weighted rows."""
  def max_body(r, mx):
    cur, prev = logits(sc_rows, ape_ref, has_prev_G1, j, r, geo, G)
    mx = jnp.maximum(mx, cur)
    return mx if prev is None else jnp.maximum(mx, prev)

  mx = loop(geo.m, max_body, jnp.full((G, 128), -jnp.inf, _F32))

  def sum_body(r, carry):
    s, acc = carry
    cur, prev = logits(sc_rows, ape_ref, has_prev_G1, j, r, geo, G)
    e = jnp.exp(cur - mx)
    s, acc = s + e, acc + e * slot_rows(kv_rows, j, r, 1, geo, G)
    if prev is not None:
      e = jnp.exp(prev - mx)  # 0 where there is no previous block
      s, acc = s + e, acc + jnp.where(has_prev_G1, e * slot_rows(kv_rows, j, r, 0, geo, G), 0.0)
    return s, acc

  zeros = jnp.zeros((G, 128), _F32)
  s, acc = loop(geo.m, sum_body, (zeros, zeros))
  return mx, s, acc / s


def rms_stats(x_GL, geo: Geometry):
  """rsqrt(mean(x²) + eps) [G, 1] over the c real lanes."""
  lane_L = lax.broadcasted_iota(jnp.int32, (1, x_GL.shape[1]), 1)
  ms = jnp.sum(jnp.where(lane_L < geo.c, x_GL * x_GL, 0.0), axis=1, keepdims=True) / geo.c
  return lax.rsqrt(ms + geo.eps)


def rope_apply(x_GW, cos_GW, sin_GW):
  """x·cos + partner(x)·sin on the tail lanes (partner: the other lane of an interleaved pair)."""
  W = x_GW.shape[1]
  even = (lax.broadcasted_iota(jnp.int32, (1, W), 1) % 2) == 0
  partner = jnp.where(even, pltpu.roll(x_GW, W - 1, 1), pltpu.roll(x_GW, 1, 1))  # x[j+1] even j, x[j-1] odd
  return x_GW * cos_GW + partner * sin_GW


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


def run_window(G: int, geo: Geometry) -> int:
  """Rows of the one window that covers the spans of G consecutive slots (any start offset inside a tile)."""
  return _round_up(G * geo.m + geo.m_off + geo.T - 1, geo.T)


def slot_window(e, Sp, geo: Geometry):
  """(first row of the T-aligned W1-row window, offset of the span in it) of the slot ending at row e, clamped
  into [0, Sp) (an empty slot, a missing previous block: real rows, masked later; the offset may then be < 0)."""
  lo = jnp.clip(e - geo.m + 1, 0, Sp - geo.m) - geo.m_off
  base = jnp.minimum(lax.bitwise_and(jnp.maximum(lo, 0), jnp.int32(-geo.T)), Sp - geo.W1)
  return base, lo - base


def _kernel(end_s, end_n, flags_ref, ape_ref, w_ref, cos_ref, sin_ref, kv_hbm, sc_hbm, *rest, geo, t0,
            fp8_nope, n_groups):
  n_out = 3 if fp8_nope else 1
  outs, (kv_run, sc_run, kv_raw, sc_raw, kv_q, sc_q, sems) = rest[:n_out], rest[n_out:]
  b, i = pl.program_id(0), pl.program_id(1)
  G = flags_ref.shape[1]
  Sp = kv_hbm.shape[1]
  m, T, W1 = geo.m, geo.T, geo.W1
  W = run_window(G, geo)
  srcs, runs, raws, qs = (kv_hbm, sc_hbm), (kv_run, sc_run), (kv_raw, sc_raw), (kv_q, sc_q)

  def plan(end_ref):
    """(whole: one window for all G slots, its first row, the offset of slot 0's span in it)."""
    e0 = end_ref[0, 0, 0, 0]
    run = lax.fori_loop(1, G, lambda g, ok: ok * (end_ref[0, 0, 0, g] == e0 + g * m).astype(jnp.int32),
                        (e0 >= 0).astype(jnp.int32))
    lo = e0 - m + 1 - geo.m_off
    base = lax.bitwise_and(jnp.maximum(lo, 0), jnp.int32(-T))
    return (run == 1) & (lo >= 0) & (base + W <= Sp), base, lo - base

  def start(end_ref, p):
    whole, base, _ = plan(end_ref)
    for a in range(2):
      src = srcs[a].at[b]

      @pl.when(whole)
      def _():  # one DMA per lane tile: the run buffer is [tiles, W, 128] (strided loads need whole lanes)
        rows = pl.ds(pl.multiple_of(base, T), W)
        for k in range(geo.K):
          pltpu.make_async_copy(src.at[rows, pl.ds(k * 128, 128)], runs[a].at[p, k], sems.at[p, a]).start()

      @pl.when(jnp.logical_not(whole))
      def _():
        def one(g, carry):
          row, _ = slot_window(end_ref[0, 0, 0, g], Sp, geo)
          pltpu.make_async_copy(src.at[pl.ds(pl.multiple_of(row, T), W1)],
                                raws[a].at[p, pl.ds(pl.multiple_of(g * W1, T), W1)], sems.at[p, a]).start()
          return carry
        lax.fori_loop(0, G, one, 0)

  p = i % 2

  @pl.when(i == 0)
  def _():
    start(end_s, p)

  @pl.when(i + 1 < n_groups)  # a constant, not pl.num_programs: interpret mode can reuse another grid's trace
  def _():
    start(end_n, 1 - p)

  whole, _, d = plan(end_s)
  L = w_ref.shape[1]
  out_dtype = jnp.dtype(geo.out_dtype)
  valid_G1 = flags_ref[0, :, 0:1] > 0
  has_prev_G1 = flags_ref[0, :, 1:2] > 0

  def finish(kv_rows, sc_rows):
    pooled = [softmax_pool(kv_rows, sc_rows, ape_ref, has_prev_G1, j, geo, G)[2] for j in range(geo.nt)]
    y = jnp.concatenate(pooled, axis=1) if geo.nt > 1 else pooled[0]
    y = y.astype(out_dtype).astype(_F32)
    y = (y * rms_stats(y, geo) * w_ref[...]).astype(out_dtype).astype(_F32)
    rotated = rope_apply(y[:, t0:], cos_ref[0], sin_ref[0]).astype(out_dtype).astype(_F32)
    entry = jnp.concatenate([y[:, :t0], rotated], axis=1) if t0 else rotated
    entry = jnp.where(valid_G1, entry, 0.0)
    outs[0][0] = entry.astype(outs[0].dtype)
    if fp8_nope:
      codes, scale_bytes = _fp8_codes(entry, lax.broadcasted_iota(jnp.int32, (1, L), 1), fp8_nope)
      outs[1][0] = codes
      outs[2][0] = scale_bytes

  @pl.when(whole)
  def _():
    rows = []
    for a in range(2):
      buf = runs[a].at[p]
      pltpu.make_async_copy(buf, buf, sems.at[p, a]).wait()  # the bytes of all this step's DMAs
      if jnp.dtype(buf.dtype).itemsize == 4:  # 32-bit rows: strided loads straight from the window
        rows.append((buf, d, d + geo.m_off, m))
      else:  # packed rows take static strided loads only: roll the window by d into float32 first
        amount = lax.rem(W - d, W)
        for k in range(geo.K):
          qs[a][k, pl.ds(0, W), :] = pltpu.roll(buf[k].astype(_F32), amount, 0)
        rows.append((qs[a], 0, geo.m_off, m))
    finish(*rows)

  @pl.when(jnp.logical_not(whole))
  def _():
    for a in range(2):
      window = raws[a].at[p, pl.ds(0, G * W1)]
      pltpu.make_async_copy(window, window, sems.at[p, a]).wait()

    def realign(g, carry):
      _, off = slot_window(end_s[0, 0, 0, g], Sp, geo)
      for a in range(2):
        roll_rows(raws[a].at[p], g * W1, off, qs[a], g, geo)
      return carry

    lax.fori_loop(0, G, realign, 0)
    finish(compact_rows(kv_q, geo), compact_rows(sc_q, geo))


def _call(end, flags, ape, w, cos, sin, kv, sc, *, geo, t0, fp8_nope, G, interpret):
  B, Np = end.shape
  L = w.shape[1]
  n = Np // G
  # end as [B, n, 1, G] (an SMEM block's last two dims must be whole): this step's slots, and the next step's.
  smem = lambda nxt: pl.BlockSpec((1, 1, 1, G), (lambda b, i: (b, jnp.minimum(i + 1, n - 1), 0, 0)) if nxt else
                                  (lambda b, i: (b, i, 0, 0)), memory_space=pltpu.SMEM)
  row_spec = lambda width: pl.BlockSpec((1, G, width), lambda b, i: (b, i, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  out_specs = [row_spec(L)]
  out_shape = [jax.ShapeDtypeStruct((B, Np, L), jnp.dtype(geo.out_dtype))]
  if fp8_nope:
    out_specs += [row_spec(L), row_spec(128)]
    out_shape += [jax.ShapeDtypeStruct((B, Np, L), jnp.int32), jax.ShapeDtypeStruct((B, Np, 128), jnp.int32)]
  W = run_window(G, geo)
  q_rows = lambda x: max(G * geo.S1, W if jnp.dtype(x.dtype).itemsize != 4 else 0)
  kernel = functools.partial(_kernel, geo=geo, t0=t0, fp8_nope=fp8_nope, n_groups=n)
  return pl.pallas_call(
      kernel,
      grid=(B, n),
      in_specs=[smem(False), smem(True), row_spec(2),
                pl.BlockSpec(ape.shape, lambda b, i: (0, 0, 0)), pl.BlockSpec(w.shape, lambda b, i: (0, 0)),
                row_spec(L - t0), row_spec(L - t0), any_spec, any_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((2, geo.K, W, 128), x.dtype) for x in (kv, sc)]
      + [pltpu.VMEM((2, G * geo.W1, x.shape[2]), x.dtype) for x in (kv, sc)]
      + [pltpu.VMEM((geo.K, q_rows(x), 128), _F32) for x in (kv, sc)] + [pltpu.SemaphoreType.DMA((2, 2))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=VMEM_LIMIT),
      interpret=interpret, name="compress_fwd")(end.reshape(B, n, 1, G), end.reshape(B, n, 1, G), flags, ape, w,
                                                cos, sin, kv, sc)


def rope_lanes(positions_BN, spec: reference.Spec, c: int, t0: int, L: int):
  """Per-lane (cos, ±sin) [..., L - t0] for lanes [t0, L): out = x·cos + partner·sin (partner = the pair's
  other lane); 1 / 0 outside the rope dims [c - r, c)."""
  cos, sin = reference.rope_tables(positions_BN, spec.rope_freqs)  # [..., r/2]
  r = spec.rope_dim
  lane = jnp.arange(t0, L)
  is_rope = (lane >= c - r) & (lane < c)
  k = jnp.clip((lane - (c - r)) // 2, 0, r // 2 - 1)
  sign = jnp.where(lane % 2 == 0, -1.0, 1.0)
  return (jnp.where(is_rope, cos[..., k], 1.0).astype(_F32),
          jnp.where(is_rope, sign * sin[..., k], 0.0).astype(_F32))


def geometry(kv_BSC, score_BSC, c: int, spec: reference.Spec) -> Geometry:
  return Geometry(m=spec.ratio, overlap=spec.overlap, c=c, T=row_tile(kv_BSC.dtype, score_BSC.dtype),
                  eps=spec.eps, out_dtype=jnp.dtype(spec.out_dtype).name)


def natural_rows(x_BSC, geo: Geometry, Sp: int):
  """[B, S, coff·c] -> [B, Sp, coff·L]: the input itself when c is a multiple of 128 and Sp = S (no copy), else
  a padded copy (each channel half to L lanes, rows to Sp)."""
  B, S, C = x_BSC.shape
  coff = 2 if geo.overlap else 1
  if geo.L == geo.c and Sp == S:
    return x_BSC
  x = _pad(x_BSC.reshape(B, S, coff, geo.c), (B, Sp, coff, geo.L))
  return x.reshape(B, Sp, coff * geo.L)


def ape_lanes(ape_MC, geo: Geometry):
  """ape [m, coff·c] -> [coff·L/128, m, 128] float32: a lane tile of a channel half per leading index (a row at
  a dynamic index is then a whole-lane load)."""
  coff = 2 if geo.overlap else 1
  ape = _pad(ape_MC.astype(_F32).reshape(geo.m, coff, geo.c), (geo.m, coff, geo.L))
  return ape.reshape(geo.m, coff * geo.nt, 128).swapaxes(0, 1)


def compress_tpu(kv_BSC, score_BSC, ape_MC, weight_C, end_BN, has_prev_BN, positions_BN, spec, *,
                 fp8: bool = False):
  """Entries [B, N, c] in spec.out_dtype (as compress_reference), or with fp8 the packed uint8 rows."""
  B, S, C = kv_BSC.shape
  c = weight_C.shape[0]
  N = end_BN.shape[1]
  out_dtype = jnp.dtype(spec.out_dtype)
  if N == 0:
    out = jnp.zeros((B, 0, c), out_dtype)
    return reference.pack_fp8(out, spec.rope_dim) if fp8 else out
  geo = geometry(kv_BSC, score_BSC, c, spec)
  L = geo.L
  t0 = (c - spec.rope_dim) // 128 * 128
  G = slots_per_step(geo.m)
  Np = _round_up(N, G)
  Sp = max(_round_up(S, geo.T), geo.W1)

  end = _pad(end_BN.astype(jnp.int32), (B, Np), -1)
  prev = _pad((has_prev_BN & (end_BN >= 0)).astype(jnp.int32), (B, Np))
  flags = jnp.stack([(end >= 0).astype(jnp.int32), prev], axis=-1)
  w = _pad(weight_C.astype(_F32)[None], (1, L))
  cos, sin = rope_lanes(_pad(positions_BN, (B, Np)), spec, c, t0, L)
  nope = c - spec.rope_dim if fp8 else 0
  if fp8 and (nope <= 0 or nope % reference.FP8_BLOCK):
    raise ValueError(f"fp8 entries need NoPE dims (c {c} - rope {spec.rope_dim}) in multiples of "
                     f"{reference.FP8_BLOCK}")
  build = lambda interpret: functools.partial(_call, geo=geo, t0=t0, fp8_nope=nope, G=G, interpret=interpret)
  outs = _on_tpu_or_interpret(build, end, flags, ape_lanes(ape_MC, geo), w, cos, sin,
                              natural_rows(kv_BSC, geo, Sp), natural_rows(score_BSC, geo, Sp))
  entries = outs[0][:, :N, :c]
  if not fp8:
    return entries
  codes, scales = outs[1][:, :N, :nope].astype(jnp.uint8), outs[2][:, :N, :nope // reference.FP8_BLOCK]
  rope = lax.bitcast_convert_type(entries[..., nope:].astype(jnp.bfloat16), jnp.uint8).reshape(B, N, -1)
  return jnp.concatenate([codes, rope, scales.astype(jnp.uint8), jnp.zeros((B, N, 1), jnp.uint8)], axis=-1)
