"""Mosaic GPU (Hopper) kernel of blockwise compression (forward): gated pooling, RMSNorm and RoPE in one pass.

One CTA (one warpgroup) per (group of G slots, batch row). A slot's window is its m rows (2m with the CSA
overlap: the m rows before the block through channels [:c], the block through [c:]), read in stages of RC
whole rows (RC | m): each stage is one contiguous bulk TMA copy (cp.async.bulk, no tensor map) per input (kv,
score; and the ape rows when ape [m, C] does not stay resident). The copies form a stream into a ring of
K = L + H buffers with L copies in flight. With the overlap the ring also keeps the H = m/RC copies last
consumed: a slot whose previous slot (same CTA) is the block just before it takes its overlap stages from those
buffers and copies nothing for them, so a run of consecutive blocks reads every row once (Flash CSA: RC = m = 4,
H = 1, one 24 KiB copy per slot). Empty slots and missing overlaps copy clamped real rows and are masked.

Math per slot, in float32 registers (1-D [c] arrays in the warpgroup-strided layout, c/128 channels per thread):
an online softmax over the stages (running max, sum, weighted kv), the pooled vector cast to out_dtype,
RMSNorm (one warpgroup reduction per slot), written to an SMEM tile [G, c]. RoPE runs once per CTA on that tile,
Gs = 128 / (r/2) slots at a time: their rope dims are copied to a [Gs, r/2, 2] pair buffer, whose even / odd
views (one pair per thread) are rotated with XLA-computed cos / sin [G, r/2] and copied back; then one bulk TMA
store of [G, c]. Requirements (`supports`): c even, r/2 a power of two <= 128 (production: c 512 or 128, r 64).
SMEM at Flash CSA (bf16 kv, f32 score, defaults): 109 KiB, two CTAs per SM. Checked on the CPU (GPU interpret
mode, the CUDA lowering: tests/test_compress_gpu.py); on the H200: experiments/check_compress_gpu.py."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.compress import reference

GROUP = 16  # slots per CTA (at least 128 / (r/2), the RoPE sub-batch)
STAGES = 2  # stages in flight (L); the ring holds L + m/RC with the overlap (Flash CSA: 3; 109 KiB of SMEM)
STAGE_BYTES = 24 * 1024  # kv + score bytes of one stage (RC whole rows)
MAX_HELD = 4  # overlap: the ring keeps the previous slot's m/RC block stages when that is at most this
APE_RESIDENT_BYTES = 32 * 1024  # ape [m, C] float32 stays in SMEM up to this size, else it streams per stage
_NEG = -1e30  # running-max start: finite, so an all-masked first stage gives exp(0) · 0, not NaN
_F32 = jnp.float32
_OUT_KWARG = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"


def _round_up(x, m):
  return -(-x // m) * m


def _copy(src, dst, barrier):
  """A bulk TMA copy of a contiguous, in-bounds GMEM slice (one cp.async.bulk, any size)."""
  plgpu.copy_gmem_to_smem(src, dst, barrier, oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)


def supports(c: int, spec) -> bool:
  """Whether the kernel takes this shape (else implementation='auto' picks the reference)."""
  r2 = len(spec.rope_freqs)
  return c % 2 == 0 and r2 & (r2 - 1) == 0 and r2 <= 128


def stage_rows(m: int, row_bytes: int, stage_bytes: int) -> int:
  """RC: the largest divisor of m whose RC rows fit stage_bytes (at least 1)."""
  return max([d for d in range(1, m + 1) if m % d == 0 and d * row_bytes <= stage_bytes] or [1])


def _kernel(kv_ref, sc_ref, ape_ref, w_ref, meta_ref, cos_ref, sin_ref, out_ref,
            kv_buf, sc_buf, ape_buf, meta_smem, out_st, pair_st, init_bar, loaded,
            *, m, c, cp, overlap, RC, G, L, H, V, eps, out_dtype, ape_resident, r2, Sp):
  g, b = lax.axis_index("g"), lax.axis_index("b")
  W = (2 if overlap else 1) * m  # window rows of a slot
  nc = W // RC  # stages per slot
  K = L + H  # ring: L copies in flight, the H last consumed kept (the next slot's overlap stages may be them)

  _copy(meta_ref.at[b, g], meta_smem, init_bar)
  if ape_resident:
    _copy(ape_ref, ape_buf, init_bar)
  plgpu.barrier_wait(init_bar)

  def aliased(k, j):  # stage (k, j) is the previous slot's block stage j + H (same rows): no copy of its own
    if not H:
      return None
    k = jnp.minimum(k, G - 1)  # the issue cursor may run past the CTA's last slot
    prev_end = meta_smem[0, jnp.maximum(k - 1, 0)]
    return (j < H) & (k > 0) & (prev_end >= 0) & (meta_smem[0, k] == prev_end + m)

  def skip_aliased(k, j):
    alias = aliased(k, j)
    return (k, j) if alias is None else (k, jnp.where(alias, H, j))

  def issue(cursor, when=None):
    """Copies stage (k, j) into ring buffer q % K when k < G (and `when`); returns the next copy's cursor."""
    k, j, q = cursor
    live = k < G if when is None else (k < G) & when

    @pl.when(live)
    def _():
      first = jnp.clip(meta_smem[0, k] - W + 1 + j * RC, 0, Sp - RC)
      slot = lax.rem(q, K)
      _copy(kv_ref.at[b, pl.ds(first, RC)], kv_buf.at[slot], loaded.at[slot])
      _copy(sc_ref.at[b, pl.ds(first, RC)], sc_buf.at[slot], loaded.at[slot])
      if not ape_resident:
        _copy(ape_ref.at[pl.ds(lax.rem(j * RC, m), RC)], ape_buf.at[slot], loaded.at[slot])

    wrap = j + 1 == nc
    nk, nj = skip_aliased(jnp.where(wrap, k + 1, k), jnp.where(wrap, 0, j + 1))
    return jnp.where(live, nk, k), jnp.where(live, nj, j), jnp.where(live, q + 1, q)

  cursor = (jnp.int32(0), jnp.int32(0), jnp.int32(0))  # next copy: slot, stage, copy index
  for _ in range(L):  # prologue: the first L copies in flight
    cursor = issue(cursor)

  strided = plgpu.Layout.WG_STRIDED((cp,), vec_size=V)
  load = lambda ref: plgpu.load(ref, layout=strided).astype(_F32)

  def stage(k, j, has_prev, carry):
    """Online-softmax update of slot k's state with its stage j (RC rows); the copy stream moves on by one
    copy when this stage had one (q: copies consumed so far)."""
    (mx, s, acc), q, cursor = carry
    alias = aliased(k, j)
    if alias is None:
      buf = lax.rem(q, K)
      plgpu.barrier_wait(loaded.at[buf])
    else:
      buf = jnp.where(alias, lax.rem(q + K - H + j, K), lax.rem(q, K))  # held: copies q - H .. q - 1

      @pl.when(jnp.logical_not(alias))
      def _():
        plgpu.barrier_wait(loaded.at[lax.rem(q, K)])

    if overlap:
      in_prev = j * RC < m
      off = jnp.where(in_prev, 0, cp)
      bias = jnp.where(in_prev & (has_prev == 0), -jnp.inf, 0.0).astype(_F32)
    else:
      off, bias = 0, 0.0
    logits, rows = [], []
    for r in range(RC):
      if ape_resident:
        ape_r = ape_buf.at[lax.rem(j * RC + r, m), pl.ds(off, cp)]
      else:
        ape_r = ape_buf.at[buf, r, pl.ds(off, cp)]
      logits.append(load(sc_buf.at[buf, r, pl.ds(off, cp)]) + load(ape_r) + bias)
      rows.append(load(kv_buf.at[buf, r, pl.ds(off, cp)]))
    new = mx
    for lg in logits:
      new = jnp.maximum(new, lg)
    alpha = jnp.exp(mx - new)
    s, acc = s * alpha, acc * alpha
    for lg, row in zip(logits, rows):
      p = jnp.exp(lg - new)
      s, acc = s + p, acc + p * row
    plgpu.commit_smem()  # every thread is done with this stage's buffer before a copy may overwrite it
    if alias is None:
      return (new, s, acc), q + 1, issue(cursor)
    consumed = jnp.logical_not(alias)  # a copy was consumed: the next one goes in flight
    return (new, s, acc), jnp.where(consumed, q + 1, q), issue(cursor, consumed)

  w = load(w_ref)  # GMEM loads (w, cos, sin are read once per CTA): less SMEM, two CTAs per SM

  def slot_body(k, carry):
    q, cursor = carry
    has_prev = meta_smem[1, k]
    zeros = jnp.zeros((cp,), _F32)
    state = (plgpu.layout_cast(jnp.full((cp,), _NEG, _F32), strided), plgpu.layout_cast(zeros, strided),
             plgpu.layout_cast(zeros, strided))
    carry = (state, q, cursor)
    if nc <= 2:
      for j in range(nc):
        carry = stage(k, jnp.int32(j), has_prev, carry)
    else:
      carry = lax.fori_loop(0, nc, lambda j, cr: stage(k, j, has_prev, cr), carry)
    state, q, cursor = carry
    _, s, acc = state
    y = (acc / s).astype(out_dtype).astype(_F32)
    inv = lax.rsqrt(jnp.sum(y * y) / c + eps)
    entry = (y * inv * w).astype(out_dtype)
    out_st[k] = jnp.where(meta_smem[0, k] >= 0, entry, jnp.zeros_like(entry))
    return q, cursor

  lax.fori_loop(0, G, slot_body, (jnp.int32(0), cursor))

  plgpu.commit_smem()  # the whole tile is written
  gs = 128 // r2  # slots per RoPE sub-batch: one pair per thread
  lanes = pl.ds(c - 2 * r2, 2 * r2)  # the rope dims
  for h in range(G // gs):
    rows = pl.ds(h * gs, gs)
    pair_st[rows] = out_st[rows, lanes].reshape(gs, r2, 2)  # [gs, r] -> pairs (a contiguous copy)
    plgpu.commit_smem()
    even, odd = pair_st.at[rows, :, 0], pair_st.at[rows, :, 1]  # one (re, im) per thread
    x0, x1 = even[...].astype(_F32), odd[...].astype(_F32)
    cos, sin = cos_ref[b, g, rows], sin_ref[b, g, rows]
    even[...] = (x0 * cos - x1 * sin).astype(out_dtype)
    odd[...] = (x0 * sin + x1 * cos).astype(out_dtype)
    plgpu.commit_smem()
    out_st[rows, lanes] = pair_st[rows].reshape(gs, 2 * r2)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_st, out_ref.at[b, pl.ds(g * G, G)])
  plgpu.wait_smem_to_gmem(0)


def _vec_size(cp: int) -> int:
  return 2 if cp % 256 == 0 else 1


def compress_gpu(kv_BSC, score_BSC, ape_MC, weight_C, end_BN, has_prev_BN, positions_BN, spec, *,
                 fp8: bool = False, interpret=None, group: int | None = None, stages: int | None = None,
                 stage_bytes: int | None = None):
  """Entries [B, N, c] in spec.out_dtype (as compress_reference), or with fp8 the packed uint8 rows (the
  reference's packer applied to the kernel's entries). `interpret`: None on an NVIDIA GPU, or a
  `plgpu.InterpretGPUParams` to run in GPU interpret mode. `group` (slots per CTA), `stages` (stages in
  flight) and `stage_bytes` override GROUP, STAGES and STAGE_BYTES (tuning)."""
  B, S = kv_BSC.shape[:2]
  c = weight_C.shape[0]
  N = end_BN.shape[1]
  m, coff = spec.ratio, (2 if spec.overlap else 1)
  out_dtype = jnp.dtype(spec.out_dtype)
  r2 = len(spec.rope_freqs)
  if not supports(c, spec):
    raise ValueError(f"the GPU compress kernel needs c even (got {c}) and rope dims / 2 a power of two <= 128 "
                     f"(got {r2}); use implementation='reference'")
  if N == 0:
    out = jnp.zeros((B, 0, c), out_dtype)
    return reference.pack_fp8(out, spec.rope_dim) if fp8 else out
  cp = _round_up(c, 128)
  Cp = coff * cp
  G = max(group or GROUP, 128 // r2)
  Np = _round_up(N, G)
  row_bytes = Cp * (jnp.dtype(kv_BSC.dtype).itemsize + jnp.dtype(score_BSC.dtype).itemsize)
  RC = stage_rows(m, row_bytes, stage_bytes or STAGE_BYTES)
  Sp = max(S, RC)

  def rows(x):  # [B, S, coff·c] -> [B, Sp, coff·cp]: channel halves padded to cp, rows to at least RC
    if cp == c and Sp == S:
      return x
    x = jnp.pad(x.reshape(B, S, coff, c), ((0, 0), (0, Sp - S), (0, 0), (0, cp - c)))
    return x.reshape(B, Sp, Cp)

  end = jnp.pad(end_BN.astype(jnp.int32), ((0, 0), (0, Np - N)), constant_values=-1)
  prev = jnp.pad((has_prev_BN & (end_BN >= 0)).astype(jnp.int32), ((0, 0), (0, Np - N)))
  meta = jnp.stack([end.reshape(B, -1, G), prev.reshape(B, -1, G)], axis=2)  # [B, n_groups, 2, G]
  cos, sin = reference.rope_tables(jnp.pad(positions_BN.astype(jnp.int32), ((0, 0), (0, Np - N))),
                                   spec.rope_freqs)
  cos, sin = cos.reshape(B, -1, G, r2), sin.reshape(B, -1, G, r2)
  ape = jnp.pad(ape_MC.astype(_F32).reshape(m, coff, c), ((0, 0), (0, 0), (0, cp - c))).reshape(m, Cp)
  w = jnp.pad(weight_C.astype(_F32), (0, cp - c))
  ape_resident = m * Cp * 4 <= APE_RESIDENT_BYTES
  L = stages or STAGES
  H = m // RC if spec.overlap and m // RC <= MAX_HELD else 0
  K = L + H
  n_groups = Np // G
  kernel = functools.partial(
      _kernel, m=m, c=c, cp=cp, overlap=spec.overlap, RC=RC, G=G, L=L, H=H, V=_vec_size(cp), eps=spec.eps,
      out_dtype=out_dtype, ape_resident=ape_resident, r2=r2, Sp=Sp)
  scratch = [
      jax.ShapeDtypeStruct((K, RC, Cp), kv_BSC.dtype),
      jax.ShapeDtypeStruct((K, RC, Cp), score_BSC.dtype),
      jax.ShapeDtypeStruct((m, Cp) if ape_resident else (K, RC, Cp), _F32),
      jax.ShapeDtypeStruct((2, G), jnp.int32),
      jax.ShapeDtypeStruct((G, cp), out_dtype),
      jax.ShapeDtypeStruct((G, r2, 2), out_dtype),  # the rope dims as (re, im) pairs
  ]
  scratch = [plgpu.SMEM(x.shape, x.dtype) for x in scratch] + [
      plgpu.Barrier(num_arrivals=2 if ape_resident else 1),
      plgpu.Barrier(num_arrivals=2 if ape_resident else 3, num_barriers=K)]
  call = plgpu.kernel(
      kernel,
      **{_OUT_KWARG: jax.ShapeDtypeStruct((B, Np, cp), out_dtype)},
      scratch_types=scratch,
      grid=(n_groups, B),
      grid_names=("g", "b"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret,
  )
  out = call(rows(kv_BSC), rows(score_BSC), ape, w, meta, cos, sin)
  entries = out[:, :N, :c]
  return reference.pack_fp8(entries, spec.rope_dim) if fp8 else entries
