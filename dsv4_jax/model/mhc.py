"""Manifold-constrained hyper-connections (spec §3): `hc_mult` residual streams mixed around each sub-layer.

Rows of `fn` / `base` are ordered [pre (n), post (n), comb (n·n)]; the streams enter a sub-layer as a
sigmoid-weighted sum (pre), and leave as `post[k]·F + Σ_j comb[j, k]·res[j]` with comb Sinkhorn-projected
(softmax + eps start, rows then columns). All math in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.model.common import param, rms_normalize


def sinkhorn(logits_NN, iters: int, eps: float):
  """Doubly-stochastic projection of exp(logits) as the official kernel does it (row softmax first)."""
  comb = jax.nn.softmax(logits_NN, axis=-1) + eps
  comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)

  def body(_, c):
    c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
    return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  return jax.lax.fori_loop(0, iters - 1, body, comb)


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
    mixed = jnp.einsum("BSJK,BSJD->BSKD", comb_BSNN, res_BSND.astype(jnp.float32), precision="highest")
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
