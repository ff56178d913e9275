"""One custom_vjp for every implementation of the op, and the pure-JAX chunked backward (the reference).

Residuals (q, kv, sink, indices, out, lse). With delta = Σ_d dO·O − dlse (per query and head) and
p_j = exp(s_j − lse), the gradients are

  ds_j = p_j · (dO·kv_j − delta),   dq = scale · Σ_j ds_j kv_j,
  dkv_j = Σ_{queries, heads that selected j} (scale · ds_j q + p_j dO)     (K = V: both roles),
  dsink = −Σ_queries exp(sink − lse) · delta.

delta and dsink are cheap [B, S, H] reductions done here in XLA; an implementation supplies dq and dkv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._query_chunks import merge_queries, split_queries
from pallas_kernels.sparse_attention import gpu, gpu_bwd, tpu
from pallas_kernels.sparse_attention.reference import sparse_attention_reference

_F32 = jnp.float32


def _chunk_grads(q_BCHD, kv_BTD, idx_BCK, do_BCHD, lse_BCH, dlt_BCH, scale, operand_dtype):
  """dq [B,C,H,D] and the dkv contributions [B,C,K,D] (float32) of a chunk of queries.

  operand_dtype float32: exact matmuls (the reference); bfloat16: tensor-core matmuls with float32 accumulation
  (the XLA formulation the Mosaic GPU backward replaced, kept for comparison: experiments/bench_kernels.py;
  p and ds are rounded to bf16 as flash-attention backward kernels do)."""
  valid_BCK = idx_BCK >= 0
  exact = operand_dtype == _F32
  prec = "highest" if exact else None
  keys_BCKD = jax.vmap(lambda kv, i: kv[i])(kv_BTD, jnp.where(valid_BCK, idx_BCK, 0)).astype(operand_dtype)
  q, do = q_BCHD.astype(operand_dtype), do_BCHD.astype(operand_dtype)
  mm = functools.partial(jnp.einsum, precision=prec, preferred_element_type=_F32)
  s_BCHK = mm("BCHD,BCKD->BCHK", q, keys_BCKD) * scale
  p_BCHK = jnp.where(valid_BCK[:, :, None], jnp.exp(s_BCHK - lse_BCH[..., None]), 0.0)
  dp_BCHK = mm("BCHD,BCKD->BCHK", do, keys_BCKD)
  ds_BCHK = p_BCHK * (dp_BCHK - dlt_BCH[..., None])
  ds, p = ds_BCHK.astype(operand_dtype), p_BCHK.astype(operand_dtype)
  dq_BCHD = scale * mm("BCHK,BCKD->BCHD", ds, keys_BCKD)
  g_BCKD = scale * mm("BCHK,BCHD->BCKD", ds, q) + mm("BCHK,BCHD->BCKD", p, do)
  return dq_BCHD, g_BCKD


def reference_bwd(q_BSHD, kv_BTD, indices_BSK, dout_BSHD, lse_BSH, delta_BSH, *, scale: float,
                  query_chunk: int = 256, operand_dtype=_F32):
  """(dq [B,S,H,D] in q's dtype, dkv [B,T,D] float32), queries in chunks: memory O(chunk · K · D), never [S, T]."""
  B, S, H, D = q_BSHD.shape
  T = kv_BTD.shape[1]
  C = min(query_chunk, S)
  b_B11 = jnp.arange(B)[:, None, None]

  def step(dkv_BTD, xs):
    q, idx, do, lse, dlt = xs
    dq, g = _chunk_grads(q, kv_BTD, idx, do, lse, dlt, scale, operand_dtype)
    dkv_BTD = dkv_BTD.at[b_B11, jnp.where(idx >= 0, idx, T)].add(g, mode="drop")
    return dkv_BTD, dq.astype(q_BSHD.dtype)

  xs = (split_queries(q_BSHD, C), split_queries(indices_BSK, C, -1), split_queries(dout_BSHD, C),
        split_queries(lse_BSH.astype(_F32), C), split_queries(delta_BSH.astype(_F32), C))
  dkv_BTD, dq = lax.scan(step, jnp.zeros((B, T, D), _F32), xs)
  return merge_queries(dq, S), dkv_BTD


_FORWARD = {"reference": sparse_attention_reference, "tpu": tpu.sparse_attention_tpu, "gpu": gpu.sparse_attention_gpu}
# the XLA formulation the Mosaic GPU backward replaced: the GPU backward on jax < 0.11 (gpu_bwd.SUPPORTED)
xla_gpu_bwd = functools.partial(reference_bwd, query_chunk=512, operand_dtype=jnp.bfloat16)
_BACKWARD = {"reference": reference_bwd, "tpu": tpu.sparse_attention_tpu_bwd,
             "gpu": gpu_bwd.sparse_attention_gpu_bwd if gpu_bwd.SUPPORTED else xla_gpu_bwd}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def sparse_attention_vjp(q, kv, sink, indices, scale: float, implementation: str):
  """The op with the shared backward; `implementation` is "reference", "tpu" or "gpu"."""
  return _FORWARD[implementation](q, kv, sink, indices, scale=scale)


def _fwd(q, kv, sink, indices, scale, implementation):
  out, lse = _FORWARD[implementation](q, kv, sink, indices, scale=scale)
  return (out, lse), (q, kv, sink, indices, out, lse)


def _bwd(scale, implementation, residuals, cotangents):
  q, kv, sink, indices, out, lse = residuals
  dout, dlse = cotangents
  delta_BSH = jnp.einsum("BSHD,BSHD->BSH", dout.astype(_F32), out.astype(_F32), precision="highest")
  delta_BSH = delta_BSH - dlse.astype(_F32)
  dsink = -jnp.sum(jnp.exp(sink.astype(_F32) - lse) * delta_BSH, axis=(0, 1))
  dq, dkv = _BACKWARD[implementation](q, kv, indices, dout, lse, delta_BSH, scale=scale)
  return dq.astype(q.dtype), dkv.astype(kv.dtype), dsink.astype(sink.dtype), None


sparse_attention_vjp.defvjp(_fwd, _bwd)
