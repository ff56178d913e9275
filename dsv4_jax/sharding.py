"""Mesh axes, the logical-axis rule table, and parameters born sharded.

Every parameter carries `logical_axes` metadata (e.g. ("experts", "embed", "mlp")); one rule table maps each
logical name to a mesh axis. A dimension whose size the mesh axis does not divide stays replicated, so tiny test
models run unchanged on any mesh. Stacked (scanned) parameters have extra leading axes, which stay replicated.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over every non-tensor axis

# logical axis -> mesh axis (None = replicated). Keep it short: it is the whole sharding policy.
RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_out": "tensor",
    "q_lora": None,
    "heads": "tensor",
    "head_dim": None,
    "index_heads": "tensor",
    "index_head_dim": None,
    "o_groups": "tensor",
    "o_group_in": None,
    "o_lora": None,
    "compress": None,
    "experts": "expert",
    "mlp": "tensor",
    "norm": None,
    "hc_mix": None,
    "hc_mult": None,
    "hc_embed": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, expert, tensor) mesh over `devices` (default: all); one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, expert, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


def partition_spec(logical_axes, shape, mesh: Mesh) -> P:
  """PartitionSpec for an array of `shape` whose trailing dims carry `logical_axes`."""
  extra = len(shape) - len(logical_axes)
  spec, used = [None] * extra, set()
  for name, size in zip(logical_axes, shape[extra:]):
    axis = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to dsv4_jax.sharding.RULES")
    if axis is None or axis in used or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def state_shardings(state, mesh: Mesh):
  """NamedShardings for every variable of an (abstract) nnx.State, from its `logical_axes` metadata."""

  def one(v):
    axes = v.get_metadata().get("logical_axes", ())
    return NamedSharding(mesh, partition_spec(axes, v.shape if hasattr(v, "shape") else v[...].shape, mesh))

  return jax.tree.map(lambda v: v.replace(one(v)), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def create_sharded(model_cls, cfg, mesh: Mesh | None, seed: int = 0):
  """Builds `model_cls(cfg, rngs=...)` with every parameter created directly on its sharding."""
  def init():
    return nnx.split(model_cls(cfg, rngs=nnx.Rngs(seed)))[1]

  abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  if mesh is None:
    state = jax.jit(init)()
  else:
    state = jax.jit(init, out_shardings=state_shardings(abstract_state, mesh))()
  return nnx.merge(graphdef, state)


def traced_under(mesh: Mesh, fn):
  """fn traced with `mesh` as the context (abstract) mesh: moe_impl "alltoall" finds its "expert" axis there and
  the Pallas kernels run per shard (dsv4_jax.model.kernel_sharding). Used by the train and serve steps."""
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced
