"""Jit-compiled prefill / decode steps over a model, the cache donated (updated in place).

  prefill = make_prefill(model)
  logits_BSV, cache = prefill(tokens_BS, cache, lengths=None, slots=None, max_context=None)
  decode = make_decode(model)
  logits_B1V, cache = decode(tokens_B1, cache, active=None, slots=None, max_context=None)

Arguments as DeepSeekV4.prefill / decode; `max_context` is static (one compile per value: pass a bucket, e.g.
the next power of two of the longest row). The parameters are split once at make time and passed to the
compiled function as arguments (not baked in as constants): rebuild the steps after changing the weights. The
cache passed in is donated: use only the one returned. One compile per tokens shape and per which optional
arguments are given.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx


def _jitted(model, method: str, extra: str):
  from dsv4_jax.serve.backend import serving_model
  graphdef, params = nnx.split(serving_model(model))  # exact MoE (moe_impl "ragged") for serving

  @functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("max_context",))
  def step(params, cache, tokens, arg, slots, max_context):
    fn = getattr(nnx.merge(graphdef, params), method)
    return fn(tokens, cache, slots=slots, max_context=max_context, **{extra: arg})

  def run(tokens, cache, arg=None, slots=None, max_context=None):
    return step(params, cache, tokens, arg, slots, max_context=max_context)

  return run


def make_prefill(model):
  """`prefill(tokens [B, S], cache, lengths=None, slots=None, max_context=None) -> (logits [B, S, V], cache)`."""
  run = _jitted(model, "prefill", "lengths")
  return lambda tokens, cache, lengths=None, slots=None, max_context=None: run(tokens, cache, lengths, slots,
                                                                               max_context)


def make_decode(model):
  """`decode(tokens [B, 1], cache, active=None, slots=None, max_context=None) -> (logits [B, 1, V], cache)`."""
  run = _jitted(model, "decode", "active")
  return lambda tokens, cache, active=None, slots=None, max_context=None: run(tokens, cache, active, slots,
                                                                              max_context)
