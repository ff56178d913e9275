"""Run a per-row kernel on each device's shard of the batch (`per_shard`).

A Pallas kernel is a custom call, which GSPMD cannot partition: under a jit with sharded operands a Mosaic TPU
kernel does not compile ("cannot be automatically partitioned"), others (interpret mode) get their operands
all-gathered and every device computes the whole batch. `per_shard` wraps such a call in `jax.shard_map` over the context mesh
(`jax.set_mesh(mesh)`, or `use_abstract_mesh` inside the jit as dsv4_jax.train.loop.traced_under does), so each
device runs the kernel on its own rows: the batch dim split over the batch axes (dsv4_jax.sharding.BATCH_AXES)
and, where the op allows it, the heads over "tensor".

Operand layouts are dim-letter strings as in the shape-suffixed names ("BSHD"): "B" is the batch dim, "H" the
heads (split over "tensor" with `split_heads` when it divides them), every other letter replicated. Batch axes
are taken in mesh order while their product divides B (a one-time warning names the op when some are left out:
those devices then repeat their neighbours' rows); nothing usable, or no mesh context, is the plain call.

Pure-JAX implementations ("reference", and "auto" where it resolves to the reference: on the CPU) are left to
GSPMD, which partitions them fine; `force()` wraps them too (tests: the reference through shard_map is cheap).
Gradients of operands replicated over an axis (sink, ape, norm_weight; kv over "tensor") are summed over its
shards by shard_map's transpose. check_vma is off: the ops' VJPs (scan carries) are not typed for varying manual
axes; the sums are still right (tests/test_kernel_sharding.py compares every gradient with the unsharded call).
"""

from __future__ import annotations

import contextlib
import logging

import jax
from jax.sharding import AxisType, PartitionSpec as P

from dsv4_jax.sharding import BATCH_AXES

log = logging.getLogger(__name__)

TENSOR_AXIS = "tensor"
_forced = False
_warned: set[str] = set()


@contextlib.contextmanager
def force():
  """Within this context (at trace time), `per_shard` wraps every implementation, the reference included."""
  global _forced
  prev, _forced = _forced, True
  try:
    yield
  finally:
    _forced = prev


def is_kernel(implementation: str) -> bool:
  """Whether `implementation` runs a Pallas kernel here (a custom call GSPMD cannot split): "tpu", "gpu", or
  "auto" on a TPU / GPU backend."""
  if implementation == "auto":
    return jax.default_backend() in ("tpu", "gpu")
  return implementation in ("tpu", "gpu")


def _warn_once(op: str, message: str):
  if op not in _warned:
    _warned.add(op)
    log.warning("%s: %s", op, message)


def plan(batch: int, heads: int | None, mesh, op: str = "op"):
  """(batch mesh axes to split B over, whether to split the heads over "tensor") on `mesh`; ((), False) = the
  plain call. `heads` None: the heads stay whole."""
  if mesh.empty:
    return (), False
  manual = set(getattr(mesh, "manual_axes", ()))
  free = [a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1]
  wanted = [a for a in BATCH_AXES if a in free]
  axes, n = [], 1
  for a in wanted:
    if batch % (n * mesh.shape[a]) == 0:
      axes.append(a)
      n *= mesh.shape[a]
  if len(axes) < len(wanted):
    sizes = {a: mesh.shape[a] for a in wanted}
    _warn_once(op, f"batch {batch} is not divisible by the mesh's batch axes {sizes}: " + (
        f"split over {axes} only (the other batch axes' devices repeat the same rows)" if axes else
        "not split (every device computes the whole batch)"))
  split_heads = heads is not None and TENSOR_AXIS in free and heads % mesh.shape[TENSOR_AXIS] == 0
  return tuple(axes), split_heads


def _spec(layout: str, batch_axes, split_heads: bool) -> P:
  dims = []
  for letter in layout:
    if letter == "B" and batch_axes:
      dims.append(batch_axes if len(batch_axes) > 1 else batch_axes[0])
    elif letter == "H" and split_heads:
      dims.append(TENSOR_AXIS)
    else:
      dims.append(None)
  return P(*dims)


def per_shard(op: str, fn, args, in_layouts, out_layouts, *, implementation: str, split_heads: bool = False,
              heads: int | None = None):
  """fn(*args), run per device on its shard when `implementation` is a kernel (is_kernel, or within force())
  and the context mesh splits the batch (module docstring).

  args: arrays; in_layouts: one dim-letter string per arg (len = its ndim); out_layouts: a string, or a tuple of
  them matching fn's outputs. split_heads: the "H" dims may be split over "tensor" (`heads` = their size, which
  it must divide). fn must treat every row (and, with split_heads, every head) independently.
  """
  for a, layout in zip(args, in_layouts, strict=True):
    if a.ndim != len(layout):
      raise ValueError(f"{op}: layout {layout!r} has {len(layout)} dims, its operand {a.shape}")
  if not (_forced or is_kernel(implementation)):
    return fn(*args)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  batch = next(a.shape[layout.index("B")] for a, layout in zip(args, in_layouts) if "B" in layout)
  batch_axes, heads_split = plan(batch, heads if split_heads else None, mesh, op)
  if not batch_axes and not heads_split:
    return fn(*args)
  manual = set(getattr(mesh, "manual_axes", ()))
  spec = lambda layout: _spec(layout, batch_axes, heads_split)
  in_specs = tuple(map(spec, in_layouts))
  out_specs = spec(out_layouts) if isinstance(out_layouts, str) else tuple(map(spec, out_layouts))
  if any(t == AxisType.Explicit for t in mesh.axis_types):  # explicit sharding: shard_map takes args as specified
    args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, in_specs))
  # Manual over every free axis: the kernel sees only its shard, replicated over the axes it does not split.
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs,
                       axis_names=frozenset(a for a in mesh.axis_names if a not in manual),
                       check_vma=False)(*args)
