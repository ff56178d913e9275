"""DeepSeekMoE with V4's router (spec §10): sqrt-softplus affinities, a selection-only bias, hash routing in
the first layers, clamped SwiGLU routed experts (grouped matmul) plus one shared expert."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv4_jax.model.common import Buffer, param


def clamped_swiglu(gate, up, limit: float):
  """silu(min(gate, limit)) · clip(up, ±limit), in float32."""
  gate, up = gate.astype(jnp.float32), up.astype(jnp.float32)
  if limit > 0:
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
  return jax.nn.silu(gate) * up


class Router(nnx.Module):
  """Top-k expert choice and combine weights; `hash` layers take the experts from a token-id table."""

  def __init__(self, cfg, *, hash_routed: bool, rngs: nnx.Rngs):
    self.cfg, self.hash_routed = cfg, hash_routed
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    self.weight = param(rngs, (cfg.hidden_size, E), ("embed", "experts"), jnp.dtype(cfg.param_dtype))
    if hash_routed:
      # A random table of distinct experts per token (the released hash function is not disclosed).
      noise = jax.random.uniform(rngs.params(), (cfg.vocab_size, E))
      self.tid2eid = Buffer(jax.lax.top_k(noise, k)[1].astype(jnp.int32), logical_axes=("vocab", None))
    else:
      self.bias = Buffer(jnp.zeros((E,), jnp.float32), logical_axes=("experts",))

  def __call__(self, x_TD, tokens_T, experts_TK=None):
    """Returns (weights [T, k] float32, experts [T, k] int32, affinities [T, E] float32).

    `experts_TK` (anticipatory routing) replaces the top-k choice; the combine weights still come from the
    current affinities at those experts.
    """
    cfg = self.cfg
    logits_TE = jnp.einsum("TD,DE->TE", x_TD.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                           precision="highest")
    scores_TE = jnp.sqrt(jax.nn.softplus(logits_TE))
    if experts_TK is not None:
      experts_TK = jax.lax.stop_gradient(experts_TK)
    elif self.hash_routed:
      experts_TK = self.tid2eid[...][tokens_T]
    else:
      _, experts_TK = jax.lax.top_k(scores_TE + self.bias[...], cfg.num_experts_per_tok)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    if cfg.norm_topk_prob:
      weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return weights_TK * cfg.routed_scaling_factor, experts_TK.astype(jnp.int32), scores_TE


def router_stats(scores_BSE, experts_BSK, n_experts: int):
  """(expert load [E]: routed-token counts over the batch; sequence-wise balance loss, mean over sequences).

  Balance loss per sequence (DeepSeek-V3 form, spec §10): Σ_i f_i · P_i with f_i = E/(k·S) · #tokens routed to
  i and P_i = mean over tokens of the affinities normalised over experts. The caller applies the weight.
  """
  B, S, K = experts_BSK.shape
  onehot_BSE = jnp.sum(jax.nn.one_hot(experts_BSK, n_experts, dtype=jnp.float32), axis=2)
  load_E = jnp.sum(onehot_BSE, axis=(0, 1))
  f_BE = jnp.sum(onehot_BSE, axis=1) * (n_experts / (K * S))
  p_BE = jnp.mean(scores_BSE / jnp.sum(scores_BSE, axis=-1, keepdims=True), axis=1)
  balance = jnp.mean(jnp.sum(jax.lax.stop_gradient(f_BE) * p_BE, axis=-1))
  return load_E, balance


# moe_impl "exact": steps of at most this many tokens (decode batches, MTP verification) run the capacity
# einsums with C = T, the rest the ragged path. The E·T buffer rows cost 2·T FLOPs per (bf16) expert weight
# read, below the H200's ~200 FLOP/byte ridge for T <= 128: free while the step is bound by reading expert
# weights; for long prompts the E/k-fold extra work is not. Even at batch 1, where the einsums read every
# expert's weights and ragged only k of them, the capacity path measured faster on the H200 (6-layer bench
# model, 8K context, per-layer weights, 2026-11-29: 12.9 ms back-to-back vs 24.6 ms with ragged at T = 1).
EXACT_CAPACITY_MAX_TOKENS = 128


def exact_uses_capacity(tokens: int) -> bool:
  """Whether moe_impl "exact" runs a step of `tokens` tokens on the capacity einsums (C = T) or ragged."""
  return tokens <= EXACT_CAPACITY_MAX_TOKENS


class RoutedExperts(nnx.Module):
  """E SwiGLU experts: a grouped (ragged) matmul over rows sorted by expert, or einsums over per-expert capacity
  buffers (cfg.moe_impl picks; "exact" picks by the step's token count)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    E, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.w1 = param(rngs, (E, d, f), ("experts", "embed", "mlp"), pdt, std=d ** -0.5)
    self.w3 = param(rngs, (E, d, f), ("experts", "embed", "mlp"), pdt, std=d ** -0.5)
    self.w2 = param(rngs, (E, f, d), ("experts", "mlp", "embed"), pdt, std=f ** -0.5)

  def __call__(self, x_TD, weights_TK, experts_TK):
    impl = moe_impl(self.cfg)
    if impl == "exact":
      T = x_TD.shape[0]
      if exact_uses_capacity(T):
        return self.capacity_matmuls(x_TD, weights_TK, experts_TK, capacity=T)
      return self.ragged_matmuls(x_TD, weights_TK, experts_TK)
    if impl == "alltoall":
      return self.alltoall_matmuls(x_TD, weights_TK, experts_TK)
    if impl == "capacity":
      return self.capacity_matmuls(x_TD, weights_TK, experts_TK)
    return self.ragged_matmuls(x_TD, weights_TK, experts_TK)

  def alltoall_matmuls(self, x_TD, weights_TK, experts_TK):
    """Expert parallel: capacity buffers all-to-all'd over the context mesh's "expert" axis
    (dsv4_jax/model/moe_alltoall.py); the capacity path without a mesh context or an "expert" axis > 1."""
    from dsv4_jax.model import moe_alltoall  # here: it imports this module
    mesh = moe_alltoall.expert_mesh()
    if mesh is None:
      return self.capacity_matmuls(x_TD, weights_TK, experts_TK)
    return moe_alltoall.alltoall_matmuls(self.cfg, self.w1[...], self.w3[...], self.w2[...], x_TD, weights_TK,
                                         experts_TK, mesh)

  def ragged_matmuls(self, x_TD, weights_TK, experts_TK):
    """Exact: rows sorted by expert, three grouped matmuls (jax.lax.ragged_dot)."""
    cfg = self.cfg
    T, D = x_TD.shape
    dt = x_TD.dtype
    flat_experts = experts_TK.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of_row = order // experts_TK.shape[1]
    group_sizes = jnp.bincount(flat_experts, length=cfg.n_routed_experts).astype(jnp.int32)
    x_RD = x_TD[token_of_row]
    gate_RF = jax.lax.ragged_dot(x_RD, self.w1[...].astype(dt), group_sizes)
    up_RF = jax.lax.ragged_dot(x_RD, self.w3[...].astype(dt), group_sizes)
    h_RF = clamped_swiglu(gate_RF, up_RF, cfg.swiglu_limit) * weights_TK.reshape(-1)[order][:, None]
    h_RF = checkpoint_name(h_RF.astype(dt), "moe_hidden")
    y_RD = jax.lax.ragged_dot(h_RF, self.w2[...].astype(dt), group_sizes)
    return jnp.zeros((T, D), jnp.float32).at[token_of_row].add(y_RD.astype(jnp.float32))

  def capacity_matmuls(self, x_TD, weights_TK, experts_TK, capacity: int | None = None):
    """Each expert gets a buffer of C = ceil(factor · T · k / E) rows (`capacity` overrides C); batched einsums
    over [E, C, D].

    Assignments past an expert's capacity are dropped (in token order), the usual training trade-off; with
    C >= T every assignment fits and the result equals the ragged path.
    """
    cfg = self.cfg
    T, D = x_TD.shape
    K = experts_TK.shape[1]
    E = cfg.n_routed_experts
    C = moe_capacity(cfg, T) if capacity is None else capacity
    if C < 1:
      raise ValueError(f"capacity_matmuls: capacity = {C} rows per expert must be >= 1")
    dt = x_TD.dtype
    flat_experts = experts_TK.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    sorted_experts = flat_experts[order]
    group_sizes = jnp.bincount(flat_experts, length=E)
    starts = jnp.cumsum(group_sizes) - group_sizes
    rank = jnp.arange(T * K) - starts[sorted_experts]
    keep = rank < C
    slot = jnp.where(keep, sorted_experts * C + rank, E * C)  # E * C = out of range: dropped
    token_of_row = order // K
    x_ECD = jnp.zeros((E * C, D), dt).at[slot].set(x_TD[token_of_row], mode="drop").reshape(E, C, D)
    w_EC = jnp.zeros((E * C,), jnp.float32).at[slot].set(weights_TK.reshape(-1)[order], mode="drop")
    gate_ECF = jnp.einsum("ECD,EDF->ECF", x_ECD, self.w1[...].astype(dt))
    up_ECF = jnp.einsum("ECD,EDF->ECF", x_ECD, self.w3[...].astype(dt))
    h_ECF = clamped_swiglu(gate_ECF, up_ECF, cfg.swiglu_limit) * w_EC.reshape(E, C, 1)
    h_ECF = checkpoint_name(h_ECF.astype(dt), "moe_hidden")
    y_ECD = jnp.einsum("ECF,EFD->ECD", h_ECF, self.w2[...].astype(dt)).reshape(E * C, D)
    y_RD = jnp.where(keep[:, None], y_ECD.at[slot].get(mode="fill", fill_value=0), 0)
    return jnp.zeros((T, D), jnp.float32).at[token_of_row].add(y_RD.astype(jnp.float32))


def moe_impl(cfg) -> str:
  if cfg.moe_impl != "auto":
    return cfg.moe_impl
  return "capacity" if jax.default_backend() == "gpu" else "ragged"


def moe_capacity(cfg, tokens: int) -> int:
  """Rows per expert buffer in the capacity path (of `tokens` tokens; the alltoall path: per token group)."""
  per_expert = tokens * cfg.num_experts_per_tok / cfg.n_routed_experts
  return max(1, min(tokens, math.ceil(cfg.moe_capacity_factor * per_expert)))


class SharedExpert(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    self.w1 = param(rngs, (d, f), ("embed", "mlp"), pdt)
    self.w3 = param(rngs, (d, f), ("embed", "mlp"), pdt)
    self.w2 = param(rngs, (f, d), ("mlp", "embed"), pdt)

  def __call__(self, x_TD):
    dt = x_TD.dtype
    h = clamped_swiglu(x_TD @ self.w1[...].astype(dt), x_TD @ self.w3[...].astype(dt), self.cfg.swiglu_limit)
    return h.astype(dt) @ self.w2[...].astype(dt)


class MoE(nnx.Module):

  def __init__(self, cfg, *, hash_routed: bool, rngs: nnx.Rngs):
    self.router = Router(cfg, hash_routed=hash_routed, rngs=rngs)
    self.experts = RoutedExperts(cfg, rngs=rngs)
    self.shared = SharedExpert(cfg, rngs=rngs) if cfg.n_shared_experts else None

  def __call__(self, x_BSD, tokens_BS, experts_BSK=None, *, collect_aux: bool = False):
    """(output [B, S, D], aux): aux holds `load`, `balance` and `experts` when collect_aux."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    forced_TK = None if experts_BSK is None else experts_BSK.reshape(B * S, -1)
    weights_TK, experts_TK, scores_TE = self.router(x_TD, tokens_BS.reshape(-1), forced_TK)
    y_TD = self.experts(x_TD, weights_TK, experts_TK)
    if self.shared is not None:
      y_TD = y_TD + self.shared(x_TD).astype(jnp.float32)
    aux = {}
    if collect_aux:
      experts_BSK = experts_TK.reshape(B, S, -1)
      aux["load"], aux["balance"] = router_stats(scores_TE.reshape(B, S, -1), experts_BSK,
                                                 self.router.cfg.n_routed_experts)
      aux["experts"] = experts_BSK
    return y_TD.astype(x_BSD.dtype).reshape(B, S, D), aux
