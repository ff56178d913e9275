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

Sharded (GSPMD): with the parameters born on a mesh (dsv4_jax.sharding.create_sharded) pass the same mesh,

  mesh = sharding.make_mesh(data=2, fsdp=2, expert=2)
  model = sharding.create_sharded(DeepSeekV4, cfg, mesh)
  cache = shard_cache(model.init_cache(batch, max_len, page_shards=mesh_page_shards(mesh, batch)), mesh)
  decode = make_decode(model, mesh)

(page_shards, dsv4_jax.model.cache: each slot's pages on its own devices, so steps over all slots read them there;
without it, a step gathers page rows on every device and sums them across devices.)

The compiled step pins the cache's in and out shardings to model.cache.cache_shardings (slots and pages split
over data × fsdp, see there for the communication), so the cache stays sharded step after step and its buffers
are donated in place; the parameters keep the shardings they carry. The step is traced with the mesh as the
context mesh, so kernel implementations (attention_impl "gpu"/"tpu") run on each device's rows
(dsv4_jax.model.kernel_sharding). A cache not yet placed so (e.g. fresh from
init_cache) is placed on the first call. Without a mesh nothing is pinned (the single-device behaviour).
"""

from __future__ import annotations

import jax
from flax import nnx

from dsv4_jax.model.cache import cache_shardings, shard_cache
from dsv4_jax.sharding import traced_under


def _jitted(model, method: str, extra: str, mesh=None, compiler_options=None):
  from dsv4_jax.serve.backend import serving_model
  graphdef, state = nnx.split(serving_model(model))  # exact MoE (moe_impl "exact") for serving
  # The parameters go in as a flat list of arrays: flattening the nested nnx.State on every call cost ~0.14 ms
  # of host time per step (CPU, the 6-layer bench model), a list next to nothing.
  params, treedef = jax.tree.flatten(state)

  def body(params, cache, tokens, arg, slots, max_context):
    fn = getattr(nnx.merge(graphdef, jax.tree.unflatten(treedef, params)), method)
    return fn(tokens, cache, slots=slots, max_context=max_context, **{extra: arg})

  if mesh is None:
    step = jax.jit(body, donate_argnums=(1,), static_argnames=("max_context",), compiler_options=compiler_options)

    def run(tokens, cache, arg=None, slots=None, max_context=None):
      return step(params, cache, tokens, arg, slots, max_context=max_context)

    return run

  steps = {}  # one jitted step per cache layout (its shardings depend on batch and num_pages)
  body = traced_under(mesh, body)  # the mesh as context: Pallas kernels run per shard (model/kernel_sharding.py)

  def run(tokens, cache, arg=None, slots=None, max_context=None):
    shardings = cache_shardings(cache, mesh)
    key = (jax.tree.structure(shardings), tuple(jax.tree.leaves(shardings)))
    if key not in steps:
      # None: the argument's own sharding (the parameters keep theirs) / the output's as GSPMD propagates it.
      steps[key] = jax.jit(body, static_argnums=(5,), donate_argnums=(1,),
                           in_shardings=(None, shardings, None, None, None), out_shardings=(None, shardings),
                           compiler_options=compiler_options)
    cache = shard_cache(cache, mesh)  # no-op for a cache already placed so (every cache a step returns)
    return steps[key](params, cache, tokens, arg, slots, max_context)  # jit takes no kwargs with in_shardings

  return run


def make_prefill(model, mesh=None, compiler_options=None):
  """`prefill(tokens [B, S], cache, lengths=None, slots=None, max_context=None) -> (logits [B, S, V], cache)`;
  with `mesh`, the cache is kept sharded on it (see the module docstring); `compiler_options` as make_decode's."""
  run = _jitted(model, "prefill", "lengths", mesh, compiler_options)
  return lambda tokens, cache, lengths=None, slots=None, max_context=None: run(tokens, cache, lengths, slots,
                                                                               max_context)


def make_decode(model, mesh=None, compiler_options=None):
  """`decode(tokens [B, 1], cache, active=None, slots=None, max_context=None) -> (logits [B, 1, V], cache)`;
  with `mesh`, the cache is kept sharded on it (see the module docstring). `compiler_options`: XLA options for
  this step only (jax.jit's), e.g. {"xla_gpu_enable_command_buffer": ""} for no CUDA graphs."""
  run = _jitted(model, "decode", "active", mesh, compiler_options)
  return lambda tokens, cache, active=None, slots=None, max_context=None: run(tokens, cache, active, slots,
                                                                              max_context)
