"""Manifold-constrained hyper-connections (spec §3): `hc_mult` residual streams mixed around each sub-layer.

Rows of `fn` / `base` are ordered [pre (n), post (n), comb (n·n)]; the streams enter a sub-layer as a
sigmoid-weighted sum (pre), and leave as `post[k]·F + Σ_j comb[j, k]·res[j]` with comb Sinkhorn-projected
(softmax + eps start, rows then columns). All math in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.model.common import param, rms_normalize


# How the unrolled Sinkhorn crosses its optimization barriers (see sinkhorn): batches of at most STACKED_MAX_ROWS
# matrices as one stacked array every ITERS_PER_FUSION iterations, larger ones as n·n arrays every iteration.
STACKED_MAX_ROWS = 1
ITERS_PER_FUSION = 4


def _total(terms):
  """Left-to-right sum of a list of same-shaped arrays (an unrolled reduction: elementwise ops only)."""
  out = terms[0]
  for t in terms[1:]:
    out = out + t
  return out


def _normalize_rows(c, eps):
  """c[i][j] / (Σ_j c[i][j] + eps), as a product with one reciprocal per row (the rewrite XLA makes anyway)."""
  out = []
  for row in c:
    r = 1.0 / (_total(row) + eps)
    out.append([v * r for v in row])
  return out


def _normalize_cols(c, eps):
  """c[i][j] / (Σ_i c[i][j] + eps), one reciprocal per column."""
  r = [1.0 / (_total([row[k] for row in c]) + eps) for k in range(len(c[0]))]
  return [[v * r_k for v, r_k in zip(row, r)] for row in c]


def _sinkhorn_unrolled(logits_NN, iters: int, eps: float):
  """The forward of `sinkhorn`: n·n arrays of the batch shape, sums written out (elementwise ops only), the
  iterations unrolled with an optimization barrier between them."""
  n = logits_NN.shape[-1]
  c = []
  for i in range(n):  # row softmax; the max is a constant shift of the row, so it carries no gradient
    row = [logits_NN[..., i, j] for j in range(n)]
    top = jax.lax.stop_gradient(functools.reduce(jnp.maximum, row))
    e = [jnp.exp(v - top) for v in row]
    s = _total(e)
    c.append([v / s + eps for v in e])
  c = _normalize_cols(c, eps)

  stacked = math.prod(logits_NN.shape[:-2]) <= STACKED_MAX_ROWS
  for it in range(1, iters):  # XLA does not fuse across a barrier
    c = _normalize_cols(_normalize_rows(c, eps), eps)
    if not stacked:  # one multi-output fusion per iteration
      c = jax.lax.optimization_barrier(c)
      continue
    if it % ITERS_PER_FUSION and it < iters - 1:
      continue
    # The n·n values cross the barrier as one stacked array: as n·n separate arrays, tiny batches (one token:
    # scalars) got one kernel per value per iteration (3,505 of the 3,889 kernels of a batch-1 decode step).
    flat = jax.lax.optimization_barrier(jnp.stack([v for row in c for v in row], axis=-1))
    c = [[flat[..., i * n + j] for j in range(n)] for i in range(n)]
  return jnp.stack([jnp.stack(row, axis=-1) for row in c], axis=-2)


def _sinkhorn_loop(logits_NN, iters: int, eps: float):
  """The same projection with reductions in a loop: the compact graph the backward pass differentiates."""
  c = jax.nn.softmax(logits_NN, axis=-1) + eps
  c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  def body(_, c):
    c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
    return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  return jax.lax.fori_loop(0, iters - 1, body, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sinkhorn(logits_NN, iters: int, eps: float):
  """Doubly-stochastic projection of exp(logits) as the official kernel does it: row softmax + eps, columns, then
  (iters - 1) × (rows, columns), each dividing by (sum + eps). logits_NN: [..., n, n] float32.

  n (hc_mult = 4) is static and tiny, so the forward keeps the matrix as n·n arrays with the sums written out:
  each iteration is elementwise code (one fusion) where reductions over the n axes launched ~5 kernels. The
  iterations are unrolled, not a while loop, with an optimization barrier between them: on the H200 the 6-layer
  bench decode step's mHC went from 0.80 ms in 578 kernels (loop) to 0.61 ms in 338 (2026-11-29); unrolled
  without barriers, XLA:GPU fused across iterations and took 266 s to compile that step (33 s now, 13 s with the
  loop; deviceless H200 compiles). How the values cross the barriers depends on the batch (its number of
  matrices): a single matrix (one token: the values are scalars) crosses as one stacked [n·n] array every
  ITERS_PER_FUSION = 4 iterations (as n·n scalars, XLA gave each value its own kernel in every iteration:
  3,898 kernels in a batch-1 decode step, 478 so; from 2 tokens on it does not: 589 at batch 2); larger batches
  cross as n·n arrays every iteration (XLA makes each iteration one multi-output fusion; stacked, the 128K × 64
  bench step took 7.58 ms back-to-back with 1 iteration per barrier and 8.33-8.42 with 4, against 7.22 ms;
  H200, 2026-11-30, `experiments/decode_ab.py`). Kernel counts (deviceless H200 compiles):
  `experiments/decode_kernels.py`, results/decode_kernels.md. The backward differentiates the loop form with
  reductions (`_sinkhorn_loop`): autodiff of the elementwise graph compiles slowly on XLA:CPU.
  """
  if logits_NN.ndim < 2 or logits_NN.shape[-2] != logits_NN.shape[-1]:
    raise ValueError(f"sinkhorn: logits_NN must end in a square [n, n] pair of axes, got shape {logits_NN.shape}")
  if iters < 1:
    raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
  return _sinkhorn_unrolled(logits_NN, iters, eps)


def _sinkhorn_fwd(logits_NN, iters, eps):
  return sinkhorn(logits_NN, iters, eps), logits_NN


def _sinkhorn_bwd(iters, eps, logits_NN, g_NN):
  return jax.vjp(lambda x: _sinkhorn_loop(x, iters, eps), logits_NN)[1](g_NN)


sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def _mixes(h_BSND, fn_MK, norm_eps: float):
  """Weightless-RMS-normed projection of the flattened streams: [B, S, M]."""
  B, S, N, D = h_BSND.shape
  x = h_BSND.reshape(B, S, N * D).astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + norm_eps)
  return jnp.einsum("BSK,MK->BSM", x, fn_MK.astype(jnp.float32), precision="highest") * inv


class HyperConnection(nnx.Module):
  """The mHC gates around one sub-layer: `pre` collapses the streams, `post` expands and mixes them back."""

  def __init__(self, hc_mult: int, dim: int, *, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
               rngs: nnx.Rngs):
    n = hc_mult
    self.hc_mult, self.sinkhorn_iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, norm_eps
    mix = (2 + n) * n
    self.fn = param(rngs, (mix, n * dim), ("hc_mix", "hc_embed"), jnp.float32, std=0.1 * (n * dim) ** -0.5)
    self.base = param(rngs, (mix,), ("hc_mix",), jnp.float32, std=0.5)
    self.scale = param(rngs, (3,), (None,), jnp.float32, init="ones")

  def pre(self, h_BSND):
    """Returns (x_BSD collapsed input in h's dtype, post_BSN, comb_BSNN)."""
    n = self.hc_mult
    mixes = _mixes(h_BSND, self.fn[...], self.norm_eps)
    scale, base = self.scale[...], self.base[...]
    pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + self.hc_eps
    post = 2 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb_logits = mixes[..., 2 * n:] * scale[2] + base[2 * n:]
    comb = sinkhorn(comb_logits.reshape(comb_logits.shape[:-1] + (n, n)), self.sinkhorn_iters, self.hc_eps)
    x = jnp.einsum("BSN,BSND->BSD", pre, h_BSND.astype(jnp.float32), precision="highest")
    return x.astype(h_BSND.dtype), post, comb

  def post(self, x_BSD, res_BSND, post_BSN, comb_BSNN):
    """New streams: h[k] = post[k]·x + Σ_j comb[j, k]·res[j]  (i.e. B_l = combᵀ)."""
    # The contraction over j (n = 4 terms) is written out: one elementwise fusion with the update below, where an
    # einsum is a separate K=4 GEMM kernel on GPU.
    res_BSND = res_BSND.astype(jnp.float32)
    mixed = _total([comb_BSNN[..., j, :, None] * res_BSND[..., j:j + 1, :] for j in range(self.hc_mult)])
    y = post_BSN[..., None] * x_BSD.astype(jnp.float32)[:, :, None, :] + mixed
    return y.astype(x_BSD.dtype)


class HyperHead(nnx.Module):
  """Final collapse of the streams before the norm and the head: sigmoid gates, no Sinkhorn."""

  def __init__(self, hc_mult: int, dim: int, *, hc_eps: float, norm_eps: float, rngs: nnx.Rngs):
    self.hc_eps, self.norm_eps = hc_eps, norm_eps
    self.fn = param(rngs, (hc_mult, hc_mult * dim), ("hc_mult", "hc_embed"), jnp.float32,
                    std=0.1 * (hc_mult * dim) ** -0.5)
    self.base = param(rngs, (hc_mult,), ("hc_mult",), jnp.float32, std=0.5)
    self.scale = param(rngs, (1,), (None,), jnp.float32, init="ones")

  def __call__(self, h_BSND):
    mixes = _mixes(h_BSND, self.fn[...], self.norm_eps)
    pre = jax.nn.sigmoid(mixes * self.scale[...] + self.base[...]) + self.hc_eps
    x = jnp.einsum("BSN,BSND->BSD", pre, h_BSND.astype(jnp.float32), precision="highest")
    return x.astype(h_BSND.dtype)
