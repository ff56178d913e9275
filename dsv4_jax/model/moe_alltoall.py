"""Expert parallelism for the routed experts: an all-to-all dispatch over the mesh's "expert" axis (moe_impl
"alltoall").

The experts are split over "expert" (ep devices, E/ep each, as the logical-axis rule "experts" -> "expert" already
shards their weights). Under `jax.shard_map`, manual over "expert" only (the data, fsdp and tensor axes stay
automatic: GSPMD still shards the token groups and gathers fsdp/tensor-sharded weights as it does elsewhere), each
group of tokens:

1. buckets its (token, expert) assignments by expert into fixed buffers [ep, E/ep, C, D] (destination device
   major), C = moe_capacity(cfg, tokens per group), assignments past C dropped in token order;
2. `all_to_all`s them over "expert": device j receives [ep (source), E/ep, C, D] for its own experts;
3. runs its E/ep experts (clamped SwiGLU, as RoutedExperts) as batched einsums;
4. `all_to_all`s the outputs back and combines them with the routing weights (applied after the down projection,
   in float32, so the weights are not sent; the capacity path applies them before it: the same function).

Token groups: the flattened tokens are split into G contiguous groups of T/G, G = ep × (the data × fsdp size when
it divides T, else 1); the batch sharding (data, fsdp, expert) makes each group one device's tokens. The drop rule
is the capacity path's applied to each group separately (capacity from the group's token count): with C >= the
group's tokens (a large moe_capacity_factor) nothing is dropped and the result is the exact MoE. Tokens are padded
to a multiple of G with inert rows (routed nowhere) when needed.

The mesh comes from the context: `jax.set_mesh(mesh)` around the jitted call, or `use_abstract_mesh` inside it
(dsv4_jax.train.loop.traced_under, which the Trainer's step, route and eval functions use). Without a mesh context, or with no "expert" axis of size > 1, this is the capacity path (the same function on
one device); a missing mesh also logs a one-time warning, so a benchmark cannot silently measure the wrong thing.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from dsv4_jax.model.moe import clamped_swiglu, moe_capacity

log = logging.getLogger(__name__)

EXPERT_AXIS = "expert"
GROUP_AXES = ("data", "fsdp")  # the batch axes sharded outside "expert" (dsv4_jax.sharding.BATCH_AXES)
_warned = False


def expert_mesh():
  """The context's abstract mesh when it has an "expert" axis of size > 1 (not already manual), else None.
  Warns once when there is no mesh context at all."""
  global _warned
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    if not _warned:
      _warned = True
      log.warning("moe_impl='alltoall' without a mesh context (jax.set_mesh): using the capacity path on the "
                  "default sharding")
    return None
  if EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
    return None
  if EXPERT_AXIS in getattr(mesh, "manual_axes", ()):
    return None
  return mesh


def num_groups(mesh, tokens: int) -> int:
  """G: token groups (one per device's batch shard) for `tokens` tokens on `mesh`."""
  ep = mesh.shape[EXPERT_AXIS]
  outer = math.prod(mesh.shape[a] for a in GROUP_AXES if a in mesh.axis_names)
  return ep * outer if tokens % (ep * outer) == 0 else ep


def dispatch_slots(experts_TK, n_experts: int, capacity: int):
  """Capacity bucketing of one group: (slot per sorted row or E·C = dropped, token of each sorted row, sort
  order). Rows sorted stably by expert keep token order; expert ids >= n_experts (padding) are always dropped."""
  T, K = experts_TK.shape
  flat = experts_TK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sorted_e = flat[order]
  counts = jnp.zeros((n_experts + 1,), jnp.int32).at[jnp.minimum(flat, n_experts)].add(1)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(T * K) - starts[jnp.minimum(sorted_e, n_experts)]
  keep = (rank < capacity) & (sorted_e < n_experts)
  slot = jnp.where(keep, sorted_e * capacity + rank, n_experts * capacity)
  return slot, order // K, order


def dropped_assignments(experts_TK, n_experts: int, capacity: int, groups: int = 1):
  """Number of (token, expert) assignments the capacity rule drops, applied to `groups` contiguous token groups
  of `capacity` rows per expert each (groups=1, capacity=moe_capacity(cfg, T): the capacity path; the alltoall
  path: groups=num_groups(mesh, T), capacity=moe_capacity(cfg, T // groups))."""
  T, K = experts_TK.shape
  if T % groups:
    raise ValueError(f"experts_TK has {T} tokens, not a multiple of groups = {groups} (pad with expert id "
                     f"{n_experts}, which is never counted)")
  onehot_GRE = jax.nn.one_hot(experts_TK.reshape(groups, (T // groups) * K), n_experts, dtype=jnp.int32)
  load_GE = jnp.sum(onehot_GRE, axis=1)
  return jnp.sum(jnp.maximum(load_GE - capacity, 0))


def alltoall_matmuls(cfg, w1_EDF, w3_EDF, w2_EFD, x_TD, weights_TK, experts_TK, mesh):
  """Routed-expert output [T, D] float32 with the experts split over mesh axis "expert" (module docstring)."""
  T, D = x_TD.shape
  K = experts_TK.shape[1]
  E = cfg.n_routed_experts
  ep = mesh.shape[EXPERT_AXIS]
  if E % ep:
    raise ValueError(f"moe_impl='alltoall': n_routed_experts = {E} must be divisible by the mesh's "
                     f"'{EXPERT_AXIS}' axis ({ep})")
  G = num_groups(mesh, T)
  pad = -T % G
  if pad:  # inert rows: expert id E is dropped by the bucketing
    x_TD = jnp.pad(x_TD, ((0, pad), (0, 0)))
    weights_TK = jnp.pad(weights_TK, ((0, pad), (0, 0)))
    experts_TK = jnp.pad(experts_TK, ((0, pad), (0, 0)), constant_values=E)
  A, Tl = G // ep, (T + pad) // G
  C = moe_capacity(cfg, Tl)
  dt = x_TD.dtype

  # [A, ep, Tl, ...]: group (a, j) = the a-th outer batch shard's j-th expert shard, as the batch sharding splits T.
  x_AXTD = x_TD.reshape(A, ep, Tl, D)
  w_AXTK = weights_TK.astype(jnp.float32).reshape(A, ep, Tl, K)
  e_AXTK = experts_TK.reshape(A, ep, Tl, K)

  def local(x_ATD, w_ATK, e_ATK, w1, w3, w2):
    # One expert shard: A groups of Tl tokens (A auto-sharded over data/fsdp), E/ep local experts.
    x_ATD, w_ATK, e_ATK = x_ATD[:, 0], w_ATK[:, 0], e_ATK[:, 0]
    El = E // ep
    slot_AR, token_AR, order_AR = jax.vmap(lambda e: dispatch_slots(e, E, C))(e_ATK)
    send = jax.vmap(lambda x, s, t: jnp.zeros((E * C, D), dt).at[s].set(x[t], mode="drop"))
    send_AXECD = send(x_ATD, slot_AR, token_AR).reshape(A, ep, El, C, D)
    recv_AXECD = jax.lax.all_to_all(send_AXECD, EXPERT_AXIS, 1, 1)  # axis 1: destination -> source
    gate = jnp.einsum("AXECD,EDF->AXECF", recv_AXECD, w1.astype(dt))
    up = jnp.einsum("AXECD,EDF->AXECF", recv_AXECD, w3.astype(dt))
    h = checkpoint_name(clamped_swiglu(gate, up, cfg.swiglu_limit).astype(dt), "moe_hidden")
    out_AXECD = jnp.einsum("AXECF,EFD->AXECD", h, w2.astype(dt))
    back_AXECD = jax.lax.all_to_all(out_AXECD, EXPERT_AXIS, 1, 1)  # back to the source, by destination

    def combine(y_ECD, s, t, o, w_TK):
      y_RD = y_ECD.reshape(E * C, D).at[s].get(mode="fill", fill_value=0).astype(jnp.float32)
      y_RD = y_RD * w_TK.reshape(-1)[o][:, None]
      return jnp.zeros((Tl, D), jnp.float32).at[t].add(y_RD)

    return jax.vmap(combine)(back_AXECD, slot_AR, token_AR, order_AR, w_ATK)[:, None]

  tokens = P(None, EXPERT_AXIS)
  experts = P(EXPERT_AXIS)
  y_AXTD = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, experts, experts, experts),
                         out_specs=tokens, axis_names={EXPERT_AXIS})(x_AXTD, w_AXTK, e_AXTK, w1_EDF, w3_EDF,
                                                                      w2_EFD)
  return y_AXTD.reshape(T + pad, D)[:T]

