"""DeepSeekV4: embedding → mHC blocks (scanned by layer type) → hc head → norm → float32 head; plus MTP.

Layers are grouped by `layer_plan` into runs of a repeating unit (Flash: 2 hash-routed SWA layers, 1 hash CSA
layer, then 20 × (HCA, CSA)); each run's parameters are stacked on a leading axis and applied with
`jax.lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.model import cache as cache_lib
from dsv4_jax.model.attention import Attention
from dsv4_jax.model.common import RMSNorm, param
from dsv4_jax.model.context import make_context
from dsv4_jax.model.decode import cached_forward
from dsv4_jax.model.mhc import HyperConnection, HyperHead
from dsv4_jax.model.moe import MoE
from dsv4_jax.model.options import INFERENCE, ForwardOptions


class LayerSpec(NamedTuple):
  ratio: int  # 0 SWA-only, 4 CSA, 128 HCA
  hash_routed: bool


def layer_plan(cfg) -> list[tuple[tuple[LayerSpec, ...], int]]:
  """Main layers as [(unit, repeats)], each unit a short tuple of layer specs repeated back to back."""
  specs = [LayerSpec(r, i < cfg.num_hash_layers) for i, r in enumerate(cfg.main_ratios)]
  if not cfg.scan_layers:
    return [((s,), 1) for s in specs]
  plan, i = [], 0
  while i < len(specs):
    best_p, best_r = 1, 1
    for p in range(1, 5):
      unit = specs[i:i + p]
      if len(unit) < p:
        break
      r = 1
      while specs[i + r * p:i + (r + 1) * p] == unit:
        r += 1
      if r >= 2 and p * r > best_p * best_r:
        best_p, best_r = p, r
    plan.append((tuple(specs[i:i + best_p]), best_r))
    i += best_p * best_r
  return plan


class Block(nnx.Module):
  """One layer: mHC(attention) then mHC(MoE), each sub-layer pre-normed inside the hyper-connection."""

  def __init__(self, cfg, spec: LayerSpec, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    hc = dict(sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps, norm_eps=cfg.rms_norm_eps)
    self.attn_hc = HyperConnection(cfg.hc_mult, cfg.hidden_size, **hc, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.attn = Attention(cfg, spec.ratio, rngs=rngs)
    self.ffn_hc = HyperConnection(cfg.hc_mult, cfg.hidden_size, **hc, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.ffn = MoE(cfg, hash_routed=spec.hash_routed, rngs=rngs)

  def __call__(self, h_BSND, ctx, tokens_BS, experts_BSK=None):
    """(streams, aux): aux is {} unless ctx.opts.collect_aux (then load, balance, experts, indexer_kl)."""
    x, post, comb = self.attn_hc.pre(h_BSND)
    y, attn_aux = self.attn(self.attn_norm(x), ctx)
    h_BSND = self.attn_hc.post(y, h_BSND, post, comb)
    x, post, comb = self.ffn_hc.pre(h_BSND)
    y, aux = self.ffn(self.ffn_norm(x), tokens_BS, experts_BSK, collect_aux=ctx.opts.collect_aux)
    if ctx.opts.collect_aux:
      aux["indexer_kl"] = attn_aux.get("indexer_kl", jnp.zeros((), jnp.float32))
    return self.ffn_hc.post(y, h_BSND, post, comb), aux


class Unit(nnx.Module):
  def __init__(self, cfg, specs, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, s, rngs=rngs) for s in specs])

  def __call__(self, h, ctx, tokens_BS, routing=None):
    """routing: None or a tuple with one [B, S, k] expert-index array per block."""
    auxes = []
    for i, block in enumerate(self.blocks):
      h, aux = block(h, ctx, tokens_BS, None if routing is None else routing[i])
      auxes.append(aux)
    return h, tuple(auxes)


class LayerStack(nnx.Module):
  """`repeats` copies of a unit with parameters stacked on axis 0, applied by `jax.lax.scan`."""

  def __init__(self, cfg, specs, repeats: int, *, rngs: nnx.Rngs):
    self.specs, self.repeats = tuple(specs), repeats

    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
      return Unit(cfg, specs, rngs=r)

    self.units = create(rngs)

  def __call__(self, h, ctx, tokens_BS, remat_policy=None, routing=None):
    """(streams, aux stacked over repeats: a tuple per unit position). routing: per position [R, B, S, k]."""
    graphdef, state = nnx.split(self.units)

    def body(carry, xs):
      unit_state, unit_routing = xs
      return nnx.merge(graphdef, unit_state)(carry, ctx, tokens_BS, unit_routing)

    if remat_policy is not None:
      body = jax.checkpoint(body, policy=remat_policy, prevent_cse=False)
    return jax.lax.scan(body, h, (state, routing))


class MTPBlock(nnx.Module):
  """Multi-token prediction (depth 1): h_t and the embedding of token t+1 → a full block → logits of t+2."""

  def __init__(self, cfg, ratio: int, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    d = cfg.hidden_size
    self.e_proj = param(rngs, (d, d), ("embed", "embed_out"), pdt)
    self.h_proj = param(rngs, (d, d), ("embed", "embed_out"), pdt)
    self.enorm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.hnorm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.block = Block(cfg, LayerSpec(ratio, False), rngs=rngs)
    self.hc_head = HyperHead(cfg.hc_mult, d, hc_eps=cfg.hc_eps, norm_eps=cfg.rms_norm_eps, rngs=rngs)
    self.norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)

  def __call__(self, h_BSND, next_embed_BSD, ctx, next_tokens_BS, experts_BSK=None):
    """Returns (streams after the block, normed features for the shared head, aux)."""
    dt = h_BSND.dtype
    e = jnp.einsum("BSD,DE->BSE", self.enorm(next_embed_BSD), self.e_proj[...].astype(dt))
    x = jnp.einsum("BSND,DE->BSNE", self.hnorm(h_BSND), self.h_proj[...].astype(dt))
    h_BSND, aux = self.block(e[:, :, None, :] + x, ctx, next_tokens_BS, experts_BSK)
    return h_BSND, self.norm(self.hc_head(h_BSND)), aux


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
  logits: jax.Array  # [B, S, V] float32: next-token logits
  mtp_logits: jax.Array | None  # [B, S, V] float32: position t predicts t+2 from h_t and tokens[t+1]
  hidden: jax.Array  # [B, S, hc, d] streams after the last main layer
  aux: dict | None = None  # with ForwardOptions(collect_aux=True): per-layer arrays, see DeepSeekV4.__call__


class DeepSeekV4(nnx.Module):
  """The DeepSeek-V4 model. `model(tokens, segment_ids=None, positions=None)` → ModelOutput."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    d, V = cfg.hidden_size, cfg.vocab_size
    self.embed = param(rngs, (V, d), ("vocab", "embed"), pdt, std=1.0)
    self.plan = tuple(layer_plan(cfg))
    self.stacks = nnx.List([LayerStack(cfg, unit, r, rngs=rngs) for unit, r in self.plan])
    self.hc_head = HyperHead(cfg.hc_mult, d, hc_eps=cfg.hc_eps, norm_eps=cfg.rms_norm_eps, rngs=rngs)
    self.norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.head = param(rngs, (d, V), ("embed", "vocab"), pdt)
    self.mtp = nnx.List([MTPBlock(cfg, r, rngs=rngs) for r in cfg.mtp_ratios])

  def layer_location(self, layer: int) -> tuple[int, int, int]:
    """(stack, repeat, position in unit) of main layer `layer` in the scanned parameter tree."""
    start = 0
    for s, (unit, repeats) in enumerate(self.plan):
      n = len(unit) * repeats
      if layer < start + n:
        rep, pos = divmod(layer - start, len(unit))
        return s, rep, pos
      start += n
    raise IndexError(f"layer {layer} out of range (model has {start} main layers)")

  def logits(self, features_BSD):
    """float32 logits; the matmul in float32 (official) or, with cfg.fp32_matmuls off, in cfg.dtype."""
    dt = jnp.float32 if self.cfg.fp32_matmuls else jnp.dtype(self.cfg.dtype)
    return jnp.einsum("BSD,DV->BSV", features_BSD.astype(dt), self.head[...].astype(dt),
                      precision="highest", preferred_element_type=jnp.float32)

  def __call__(self, tokens, segment_ids=None, positions=None, *, with_mtp: bool = True, remat_policy=None,
               options: ForwardOptions = INFERENCE, routing=None):
    """Logits (and MTP logits) for int32 tokens [B, S].

    options: training-time switches (ForwardOptions). With `collect_aux`, `ModelOutput.aux` holds, per MoE
      layer in order (main layers, then the MTP block when it ran): `load` [L, E] routed-token counts,
      `balance` [L] sequence-wise balance loss, `experts` [L, B, S, k] routing indices, `indexer_kl` [L] (0
      where the layer has no indexer or options.indexer_loss is off).
    routing: [L, B, S, k] int32 expert indices to use instead of the routers' own choice (anticipatory
      routing: indices from an earlier forward); combine weights still come from the current parameters.
    """
    cfg = self.cfg
    tokens_BS = jnp.asarray(tokens, jnp.int32)
    if tokens_BS.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq] int32, got shape {tokens_BS.shape}")
    run_mtp = with_mtp and len(self.mtp) > 0
    n_moe = cfg.num_hidden_layers + int(run_mtp)
    if routing is not None and routing.shape[:3] != (n_moe,) + tokens_BS.shape:
      raise ValueError(f"routing must be [{n_moe}, B, S, k] (MoE layers incl. MTP when it runs, then the "
                       f"token shape {tokens_BS.shape}), got {routing.shape}")
    ctx = make_context(cfg, tokens_BS, segment_ids, positions, options)
    dt = jnp.dtype(cfg.dtype)
    embed_VD = self.embed[...]
    x_BSD = embed_VD[tokens_BS].astype(dt)
    h = jnp.broadcast_to(x_BSD[:, :, None, :], x_BSD.shape[:2] + (cfg.hc_mult, cfg.hidden_size))
    auxes, start = [], 0
    for stack in self.stacks:
      R, P = stack.repeats, len(stack.specs)
      stack_routing = None
      if routing is not None:
        r_RPBSK = routing[start:start + R * P].reshape((R, P) + routing.shape[1:])
        stack_routing = tuple(r_RPBSK[:, p] for p in range(P))
      h, stack_aux = stack(h, ctx, tokens_BS, remat_policy, stack_routing)
      if options.collect_aux:  # [R] per position -> layer order start + r·P + p
        auxes.append(jax.tree.map(lambda *a: jnp.stack(a, 1).reshape((R * P,) + a[0].shape[1:]), *stack_aux))
      start += R * P
    logits = self.logits(self.norm(self.hc_head(h)))
    mtp_logits = None
    if run_mtp:
      next_BS = jnp.concatenate([tokens_BS[:, 1:], jnp.zeros_like(tokens_BS[:, :1])], axis=1)
      _, feats, mtp_aux = self.mtp[0](h, embed_VD[next_BS].astype(dt), ctx, next_BS,
                                      None if routing is None else routing[-1])
      mtp_logits = self.logits(feats)
      if options.collect_aux:
        auxes.append(jax.tree.map(lambda a: a[None], mtp_aux))
    aux = jax.tree.map(lambda *a: jnp.concatenate(a, 0), *auxes) if options.collect_aux else None
    return ModelOutput(logits=logits, mtp_logits=mtp_logits, hidden=h, aux=aux)

  # ----- inference with a cache (spec §8; dsv4_jax.serve.steps has the jitted, donating wrappers) -----------
  def init_cache(self, batch: int, max_len: int, *, kv_format: str | None = None, page_tokens: int | None = None,
                 num_pages: int | None = None, page_shards: int = 1) -> cache_lib.InferenceCache:
    """An empty InferenceCache of `batch` slots of up to `max_len` tokens (main layers; MTP not cached).

    kv_format: "fp8" (spec §8.1 layout), "bf16" or "float32"; default "fp8" for a QAT model
    (cfg.simulate_quant: its entries are already on the FP8/FP4 grids, so storing them is exact), else the
    activation dtype's lossless format. page_shards: a free stack per shard of slots (on a mesh:
    cache_lib.mesh_page_shards(mesh, batch), so each slot's pages lie on its own devices).
    """
    cfg = self.cfg
    if kv_format is None:
      kv_format = "fp8" if cfg.simulate_quant else ("bf16" if cfg.dtype == "bfloat16" else "float32")
    return cache_lib.init_cache(cfg, self.plan, batch, max_len, kv_format=kv_format, page_tokens=page_tokens,
                                num_pages=num_pages, page_shards=page_shards)

  def prefill(self, tokens, cache, lengths=None, *, slots=None, max_context: int | None = None):
    """(logits [B, S, V] float32, cache) after appending tokens [B, S] to the cached sequences.

    lengths: [B] valid tokens per (right-padded) row, 0 leaves a row untouched; logits past a row's length are
    meaningless. Call it again on the next chunk of a long prompt: chunks give the same logits and cache as one
    call. slots: [B] cache slots the rows go to (continuous batching), default row b -> slot b.
    max_context (static): bound on the rows' lengths after the call; reads then stop at the pages it needs
    (see dsv4_jax.model.decode.cached_forward).
    """
    logits, _, cache = cached_forward(self, tokens, cache, lengths, slots, max_context)
    return logits, cache

  def decode(self, tokens, cache, *, active=None, slots=None, max_context: int | None = None):
    """(logits [B, 1, V] float32, cache) for one new token per sequence, tokens [B, 1].

    active: [B] bool, rows that step (others untouched); slots, max_context: as in prefill.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] != 1:
      raise ValueError(f"decode takes tokens [batch, 1], got shape {tokens.shape} (use prefill for chunks)")
    counts = None if active is None else jnp.asarray(active, jnp.int32)
    logits, _, cache = cached_forward(self, tokens, cache, counts, slots, max_context)
    return logits, cache

  def moe_layer_flags(self, with_mtp: bool = True):
    """Static per-MoE-layer facts in aux order: (hash_routed, has_indexer) tuples of bools."""
    cfg = self.cfg
    ratios = list(cfg.main_ratios) + (list(cfg.mtp_ratios[:1]) if with_mtp else [])
    hashed = [i < cfg.num_hash_layers for i in range(cfg.num_hidden_layers)] + [False] * (len(ratios) -
                                                                                        cfg.num_hidden_layers)
    return tuple(hashed), tuple(r == 4 for r in ratios)

  def update_routing_bias(self, load_LE, speed: float, with_mtp: bool = True):
    """Aux-loss-free balancing (spec §10): bias_i += speed · sign(mean load − load_i) for each bias-routed layer.

    load_LE: expert loads in aux order (main layers, then MTP). Hash-routed layers have no bias and are skipped.
    """
    cfg = self.cfg
    hashed, _ = self.moe_layer_flags(with_mtp)
    delta_LE = speed * jnp.sign(jnp.mean(load_LE, axis=-1, keepdims=True) - load_LE)
    for layer in range(cfg.num_hidden_layers):
      if hashed[layer]:
        continue
      s, rep, pos = self.layer_location(layer)
      bias = self.stacks[s].units.blocks[pos].ffn.router.bias
      bias[...] = bias[...].at[rep].add(delta_LE[layer])
    if with_mtp and len(self.mtp):
      bias = self.mtp[0].block.ffn.router.bias
      bias[...] = bias[...] + delta_LE[cfg.num_hidden_layers]
