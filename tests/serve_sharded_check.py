"""Helper for tests/test_serve_sharding.py, run in its own process: 8 fake CPU devices must be set before jax starts.

  python tests/serve_sharded_check.py   ->  one JSON line on stdout
  python tests/serve_sharded_check.py --collectives   ->  the collectives of a sharded decode step (not a test)

A tiny model (a CSA and an HCA layer) born sharded (`sharding.create_sharded`; on the second mesh the same weights
placed on its parameter shardings), its cache sharded (`model.cache.shard_cache`), served by the jitted, donating
steps of `serve.steps` with that mesh: a prefill of rows of different lengths, then decode steps that cross the
16-token window and the 128-token HCA block. Logits and the final cache are compared with the same weights and
steps on one device, and the cache arrays' shardings after the steps with the ones cache_shardings asks for.
On the first mesh, the engine's CachedBackend(mesh=...) too: prefill two slots, decode, release one and prefill it
again, against the one-device logits.
"""

from __future__ import annotations

import json
import os
import re

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv4_jax import sharding  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model.cache import cache_shardings, mesh_page_shards, shard_cache  # noqa: E402
from dsv4_jax.model.transformer import DeepSeekV4  # noqa: E402
from dsv4_jax.serve.cache import fork_slot  # noqa: E402
from dsv4_jax.serve.cached_backend import CachedBackend  # noqa: E402
from dsv4_jax.serve.params import SamplingParams  # noqa: E402
from dsv4_jax.serve.sampling import SamplingRows  # noqa: E402
from dsv4_jax.serve.steps import make_decode, make_prefill  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# (data, fsdp, expert, tensor); "page shards": the cache with a free stack per data x fsdp shard (page reads local)
MESHES = {"2x2x2x1": (2, 2, 2, 1), "1x2x2x2": (1, 2, 2, 2), "2x2x2x1 page shards": (2, 2, 2, 1)}
# A CSA and an HCA layer (every layer also has the window ring of an SWA one), no MTP (compile time).
CFG = ModelConfig.preset("tiny", num_hidden_layers=2, compress_ratios=(4, 128), num_nextn_predict_layers=0)
B, S, MAX_LEN, PAGE = 4, 128, 256, 128
PROMPTS = np.array([124, 10, 126, 3], np.int32)  # row 0 crosses the HCA block (128) and row 1 the window (16)
STEPS = 8
ACTIVE = np.array([[True] * B] * STEPS)
ACTIVE[3, 3] = False  # one step with an idle row


def serve(model, mesh, tokens, page_shards=1):
  """Logits [B, S + STEPS, V] (prompt positions, then one per decode step), the final cache, and whether each
  step's input cache was donated."""
  prefill, decode = make_prefill(model, mesh), make_decode(model, mesh)
  cache = model.init_cache(B, MAX_LEN, kv_format="float32", page_tokens=PAGE, page_shards=page_shards)
  if mesh is not None:
    cache = shard_cache(cache, mesh)
  logits, new = prefill(jnp.asarray(tokens[:, :S]), cache, jnp.asarray(PROMPTS))
  donated = [all(a.is_deleted() for a in jax.tree.leaves(cache))]
  out = [np.asarray(logits)]
  pos = PROMPTS.copy()
  for i in range(STEPS):
    cache = new
    step = tokens[np.arange(B), pos][:, None]
    logits, new = decode(jnp.asarray(step), cache, jnp.asarray(ACTIVE[i]))
    donated.append(all(a.is_deleted() for a in jax.tree.leaves(cache)))
    out.append(np.asarray(logits))
    pos = pos + ACTIVE[i]
  return out, new, all(donated)


def backend_run(model, mesh, tokens, prompt_logits):
  """A CachedBackend session on `mesh` (slots prefilled, decoded, released, reused): its largest relative
  difference from the one-device prompt logits of the same sequences (`prompt_logits` [B, S, V], all positions
  inside the rows' prompts), and its final cache."""
  backend = CachedBackend(model, 2, 64, kv_format="float32", bucket=32, mesh=mesh)  # one prefill compile
  got = [(backend.prefill(0, tokens[0, :20]), (0, 19)), (backend.prefill(1, tokens[1, :5]), (1, 4))]
  for i in range(3):
    logits = backend.decode([0, 1], [tokens[0, 20 + i], tokens[1, 5 + i]])
    got += [(logits[0], (0, 20 + i)), (logits[1], (1, 5 + i))]
  backend.release(1)
  got.append((backend.prefill(1, tokens[2, :7]), (2, 6)))  # the freed slot reused
  logits = backend.decode([0, 1], [tokens[0, 23], tokens[2, 7]])
  got += [(logits[0], (0, 23)), (logits[1], (2, 7))]
  # The engine's dispatch-ahead steps on the mesh: greedy tokens drawn on the device, the cache kept sharded.
  backend.release(0)
  greedy = SamplingRows.build(1, {0: (SamplingParams(seed=0), 0)})
  first = int(backend.prefill_sample(0, tokens[0, :20], greedy).read()[0])
  nxt = backend.decode_sample([0, 1], SamplingRows.build(2, {})).read()
  ahead = {"first_token_is_argmax": first == int(np.argmax(prompt_logits[0, 19])),
           "tokens_in_vocab": bool(np.all((nxt >= 0) & (nxt < prompt_logits.shape[-1])))}
  return max(rel(np.asarray(x), prompt_logits[b, p]) for x, (b, p) in got), backend.cache, ahead


def rel(a, b):
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def abs_diff(a, b):
  """Largest |a - b| (equal entries count 0, so equal infinities too; inf where they differ)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.where(a == b, 0.0, np.abs(a - b)), initial=0.0))


def pages_in_shards(cache) -> bool:
  """Every slot's pages lie in its page shard's id range (dsv4_jax.model.cache)."""
  table, n, per = np.asarray(cache.page_table), cache.shard_pages, cache.batch // cache.page_shards
  return all(np.all(row[row >= 0] // n == b // per) for b, row in enumerate(table))


def slot_view(cache) -> list:
  """What a cache holds per slot, whatever its page ids: lengths, state rows, each slot's pages in order."""
  table = np.asarray(cache.page_table)
  held = lambda pool: np.where((table >= 0).reshape(table.shape + (1,) * (pool.ndim - 2)),
                               np.asarray(pool)[:, np.maximum(table, 0)], 0)
  return [np.asarray(cache.lengths)] + [np.asarray(a) for a in jax.tree.leaves(cache.states)] + [
      held(a) for a in jax.tree.leaves(cache.pools)]


def main():
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, S + STEPS)).astype(np.int32)
  report = {"devices": len(jax.devices()), "meshes": {}}
  reference = None
  for name, shape in MESHES.items():
    name, page_shards = name.split(" ")[0], "page shards" in name
    mesh = sharding.make_mesh(*shape)
    if reference is None:  # born sharded on the first mesh; the same weights on one device, steps without a mesh
      model = sharding.create_sharded(DeepSeekV4, CFG, mesh, seed=0)
      graphdef, weights = nnx.graphdef(model), jax.tree.map(np.asarray, nnx.state(model))
      one = nnx.merge(graphdef, jax.device_put(weights, jax.devices()[0]))
      ref_out, ref_cache, _ = serve(one, None, tokens)
      reference = ([np.asarray(x) for x in ref_out], [np.asarray(x) for x in jax.tree.leaves(ref_cache)],
                   slot_view(ref_cache))
      backend_diff, backend_cache, ahead = backend_run(model, mesh, tokens, reference[0][0])
      report["backend"] = {"dispatch_ahead": ahead,
          "logits_rel_diff": backend_diff,  # decode vs prefill paths too: test_decode's 1e-4 bound
          "shardings_as_intended": all(a.sharding.is_equivalent_to(w, a.ndim) for a, w in zip(
              jax.tree.leaves(backend_cache), jax.tree.leaves(cache_shardings(backend_cache, mesh)))),
          "pool_specs": sorted({str(a.sharding.spec) for a in jax.tree.leaves(backend_cache.pools)}),
      }
      first = model
    elif page_shards:
      model = first
    else:  # the same weights placed on this mesh's parameter shardings (create_sharded's jitted init costs ~12 s)
      model = nnx.merge(graphdef, jax.device_put(weights, sharding.state_shardings(nnx.state(one), mesh)))
    out, cache, donated = serve(model, mesh, tokens, mesh_page_shards(mesh, B) if page_shards else 1)
    # Prompt positions past a row's length are meaningless; compare valid prompt logits and every decode step.
    prompt_diff = max(rel(out[0][b, :p], reference[0][0][b, :p]) for b, p in enumerate(PROMPTS))
    decode_diff = max(rel(o[ACTIVE[i]], r[ACTIVE[i]]) for i, (o, r) in enumerate(zip(out[1:], reference[0][1:])))
    want = jax.tree.leaves(cache_shardings(cache, mesh))
    leaves = jax.tree.leaves(cache)
    pools = jax.tree.leaves(cache.pools)
    report["meshes"][name + (" page shards" if page_shards else "")] = {
        "prompt_rel_diff": prompt_diff, "decode_rel_diff": decode_diff,
        "cache_max_abs_diff": max(abs_diff(a, r) for a, r in (  # other page ids with page shards: per slot
            zip(slot_view(cache), reference[2]) if page_shards else zip(leaves, reference[1]))),
        "lengths": np.asarray(cache.lengths).tolist(), "overflow": bool(cache.overflow), "donated": donated,
        "shardings_as_intended": all(a.sharding.is_equivalent_to(w, a.ndim) for a, w in zip(leaves, want)),
        "pool_specs": sorted({str(a.sharding.spec) for a in pools}),
        "pool_shard_fraction": max(a.addressable_shards[0].data.size / a.size for a in pools),
        "state_specs": sorted({str(a.sharding.spec) for a in jax.tree.leaves(cache.states)}),
        "page_table_spec": str(cache.page_table.sharding.spec),
        "sharded_params": sum(1 for x in jax.tree.leaves(nnx.state(model)) if not x.sharding.is_fully_replicated),
    }
    if page_shards:
      report["page_shards"] = {"shards": cache.page_shards, "pages_in_shards": pages_in_shards(cache)}
      forked = shard_cache(fork_slot(cache, 0, 1), mesh)  # across shards: every page copied into slot 1's shard
      report["page_shards"].update(forked_in_shards=pages_in_shards(forked), fork_overflow=bool(forked.overflow))
      report["collectives"] = {str(p): cache_collectives(collectives(first, page_shards=p))
                               for p in (False, True)}
  print(json.dumps(report))


def collectives(model=None, batch=8, max_len=4096, page_shards=False):
  """{collective op: [result shapes]} of the compiled decode step on the data 2 x fsdp 2 x expert 2 mesh, traced
  under it as serve.steps does, the cache with one free stack (cache_shardings' docstring: page reads summed
  across devices, no all-gather of the pool) or with page shards (page reads per device)."""
  import re

  from dsv4_jax.serve.backend import serving_model
  mesh = sharding.make_mesh(2, 2, 2, 1)
  model = sharding.create_sharded(DeepSeekV4, CFG, mesh, seed=0) if model is None else model
  graphdef, params = nnx.split(serving_model(model))
  shards = mesh_page_shards(mesh, batch) if page_shards else 1
  cache = jax.eval_shape(lambda: model.init_cache(batch, max_len, kv_format="float32", page_tokens=128,
                                                  page_shards=shards))
  sh = cache_shardings(cache, mesh)
  cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, sh)
  body = sharding.traced_under(mesh, lambda p, c, t: nnx.merge(graphdef, p).decode(t, c))
  step = jax.jit(body, in_shardings=(None, sh, None), out_shardings=(None, sh), donate_argnums=(1,))
  text = step.lower(params, cache, jax.ShapeDtypeStruct((batch, 1), jnp.int32)).compile().as_text()
  found = {"pool_rows": [tuple(a.shape[2:]) for a in jax.tree.leaves(cache.pools)], "max_pages": cache.max_pages}
  for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
    found[op] = re.findall(r"= (\w+\[[0-9,]*\])\S* " + op + r"(?:-start)?\(", text)
  return found


def cache_collectives(found) -> dict:
  """{op: [all ops, ops whose result holds gathered cache rows]}: a result ending in (pages, rows per page,
  entry width) of one of the pools (the page reads of cache_shardings' docstring)."""
  tails = {(found["max_pages"],) + rows for rows in found["pool_rows"]}
  dims = lambda shape: tuple(int(d) for d in re.findall(r"\d+", shape.split("[")[1]))
  return {op: [len(shapes), sum(dims(s)[-3:] in tails for s in shapes)] for op, shapes in found.items()
          if op not in ("pool_rows", "max_pages")}


def size(shape: str) -> int:
  return int(np.prod([int(d) for d in re.findall(r"\d+", shape.split("[")[1])] or [1]))


def print_collectives():
  for page_shards in (False, True):
    found = collectives(page_shards=page_shards)
    print("page shards" if page_shards else "one free stack")
    print("  ops (all, with gathered cache rows):", cache_collectives(found))
    for op, shapes in found.items():
      if op in ("pool_rows", "max_pages"):
        continue
      print(f"  {op}: {len(shapes)} ops, largest results {sorted(set(shapes), key=size, reverse=True)[:4]}")


if __name__ == "__main__":
  import sys
  print_collectives() if "--collectives" in sys.argv else main()
