"""One jit-compiled, sharded train step: microbatched forward/backward, Muon + AdamW update, routing-bias update.

The state is a pytree of arrays (params, buffers, optimizer state, step, rng), donated to the step. A step whose
loss or gradient is not finite leaves the state untouched (and says so in its metrics), so a NaN never reaches
the parameters, let alone a checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv4_jax.model.options import ForwardOptions
from dsv4_jax.train import losses

STAGES = ("dense", "warmup", "sparse")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any  # nnx.State of nnx.Param
  buffers: Any  # nnx.State of everything else (routing bias, hash tables)
  opt_state: Any
  rng: jax.Array  # uint32 key data


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the compiled step (changing one recompiles)."""
  grad_accum: int = 1
  stage: str = "sparse"  # "dense" | "warmup" | "sparse": the indexer curriculum (spec §12)
  balance_weight: float = 1e-4
  indexer_weight: float = 1.0
  bias_update_speed: float = 1e-3
  with_mtp: bool = True
  remat: str = "none"  # "none" | "full" | "save_attention" | "save_dots"

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
    if self.grad_accum < 1:
      raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")

  def forward_options(self) -> ForwardOptions:
    if self.stage == "dense":
      return ForwardOptions(collect_aux=True, attention="dense")
    if self.stage == "warmup":
      return ForwardOptions(collect_aux=True, attention="dense", indexer_loss=True)
    return ForwardOptions(collect_aux=True, attention="sparse", indexer_loss=True, detach_indexer_input=True)


REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names("attn_q", "attn_kv", "attn_out"),
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def is_indexer_path(path) -> bool:
  return any(getattr(k, "key", getattr(k, "name", None)) == "indexer" for k in path)


def trainable_mask(params, stage: str):
  """Which parameters the stage trains: dense → all but the indexers; warmup → only the indexers; sparse → all."""
  def one(path, _):
    idx = is_indexer_path(path)
    return {"dense": not idx, "warmup": idx, "sparse": True}[stage]
  return jax.tree_util.tree_map_with_path(one, params)


def split_model(model):
  """(graphdef, params, buffers) of an nnx model."""
  return nnx.split(model, nnx.Param, ...)


def init_state(model, tx, seed: int = 0) -> TrainState:
  graphdef, params, buffers = split_model(model)
  del graphdef
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def _microbatches(batch, n: int):
  def split(a):
    if a.shape[0] % n:
      raise ValueError(f"batch of {a.shape[0]} rows does not split into grad_accum={n} microbatches")
    return a.reshape((n, a.shape[0] // n) + a.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, scfg: StepConfig):
  """fn(state, batch, hparams, routing=None) -> (state, metrics).

  batch: dict of int32 [B, S] `tokens`, `segment_ids`, `positions` (segment 0 = padding).
  hparams: dict of float32 scalars read each step (`mtp_weight`, `lr_scale`), so schedules never recompile.
  routing: optional [L, B, S, k] expert indices (anticipatory routing), split with the batch.
  """
  opts = scfg.forward_options()
  policy = REMAT_POLICIES[scfg.remat]

  def forward_terms(params, buffers, mb, routing):
    model = nnx.merge(graphdef, params, buffers)
    out = model(mb["tokens"], mb["segment_ids"], mb["positions"], with_mtp=scfg.with_mtp,
                remat_policy=policy, options=opts, routing=routing)
    hashed, has_indexer = model.moe_layer_flags(scfg.with_mtp and out.mtp_logits is not None)
    terms = losses.lm_losses(out, mb["tokens"], mb["segment_ids"], hash_routed=hashed, has_indexer=has_indexer)
    return terms, out.aux["load"]

  def step_fn(state: TrainState, batch, hparams, routing=None):
    n = scfg.grad_accum
    mbs = _microbatches(batch, n)
    routing_mbs = None if routing is None else jnp.moveaxis(_microbatches(jnp.moveaxis(routing, 0, 1), n), 2, 1)
    # Global token counts first, so each microbatch's loss is its exact share of the full-batch loss.
    _, mask1 = losses.shifted_targets(batch["tokens"], batch["segment_ids"], 1)
    _, mask2 = losses.shifted_targets(batch["tokens"], batch["segment_ids"], 2)
    count1 = jnp.maximum(jnp.sum(mask1.astype(jnp.float32)), 1.0)
    count2 = jnp.maximum(jnp.sum(mask2.astype(jnp.float32)), 1.0)

    def micro_loss(params, mb, r):
      terms, load = forward_terms(params, state.buffers, mb, r)
      loss = (terms["ce_sum"] / count1 + hparams["mtp_weight"] * terms["mtp_sum"] / count2
              + (scfg.balance_weight * terms["balance"] + scfg.indexer_weight * terms["indexer_kl"]) / n)
      return loss, (terms, load)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, xs):
      mb, r = xs
      (loss, (terms, load)), grads = grad_fn(state.params, mb, r)
      acc_grads, acc_loss, acc_terms, acc_load = carry
      return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss,
              jax.tree.map(jnp.add, acc_terms, terms), acc_load + load), None

    zeros_terms = {k: jnp.zeros((), jnp.float32) for k in
                   ("ce_sum", "ce_count", "mtp_sum", "mtp_count", "balance", "indexer_kl")}
    cfg = nnx.merge(graphdef, state.params, state.buffers).cfg
    n_moe = cfg.num_hidden_layers + int(scfg.with_mtp and cfg.num_nextn_predict_layers > 0)
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), zeros_terms,
            jnp.zeros((n_moe, cfg.n_routed_experts), jnp.float32))
    (grads, loss, terms, load_LE), _ = jax.lax.scan(accumulate, init, (mbs, routing_mbs))

    mask = trainable_mask(state.params, scfg.stage)
    grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0).astype(g.dtype), grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u, m: (u * hparams["lr_scale"]).astype(u.dtype) if m else jnp.zeros_like(u),
                           updates, mask)
    finite = finite & jnp.isfinite(optax.global_norm(updates))  # e.g. a non-finite lr_scale
    params = optax.apply_updates(state.params, updates)

    # copy=True: the bias update mutates Variables, which would otherwise be shared with state.buffers.
    model = nnx.merge(graphdef, params, state.buffers, copy=True)
    if scfg.bias_update_speed and scfg.stage != "warmup":
      model.update_routing_bias(load_LE, scfg.bias_update_speed, with_mtp=n_moe > cfg.num_hidden_layers)
    _, _, buffers = split_model(model)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32),
        params=keep(params, state.params),
        buffers=keep(buffers, state.buffers),
        opt_state=keep(opt_state, state.opt_state),
        rng=keep(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)),
                 state.rng),
    )
    metrics = dict(
        loss=loss,
        ce=terms["ce_sum"] / count1,
        mtp_ce=terms["mtp_sum"] / count2,
        balance=terms["balance"] / n,
        indexer_kl=terms["indexer_kl"] / n,
        grad_norm=grad_norm,
        tokens=terms["ce_count"],
        finite=finite,
        max_expert_load=jnp.max(load_LE / jnp.maximum(jnp.mean(load_LE, axis=-1, keepdims=True), 1e-9)),
    )
    return new_state, metrics

  return step_fn


def make_eval_step(graphdef):
  """fn(params, buffers, batch) -> (ce_sum, ce_count): next-token CE on a batch, inference options."""
  def eval_fn(params, buffers, batch):
    model = nnx.merge(graphdef, params, buffers)
    out = model(batch["tokens"], batch["segment_ids"], batch["positions"], with_mtp=False)
    targets, mask = losses.shifted_targets(batch["tokens"], batch["segment_ids"], 1)
    return losses.cross_entropy(out.logits, targets, mask)
  return eval_fn


def make_route_fn(graphdef, with_mtp: bool = True):
  """fn(params, buffers, batch) -> [L, B, S, k] routing indices: the extra forward of anticipatory routing."""
  def route_fn(params, buffers, batch):
    model = nnx.merge(graphdef, params, buffers)
    out = model(batch["tokens"], batch["segment_ids"], batch["positions"], with_mtp=with_mtp,
                options=ForwardOptions(collect_aux=True))
    return out.aux["experts"]
  return route_fn
