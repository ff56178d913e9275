"""The training optimizer (spec §12): Muon with hybrid Newton–Schulz for matrices, AdamW for the rest.

  sched = lr_schedule(peak_lr, warmup_steps, total_steps, decay_start, end_lr)
  tx = build_optimizer(params, learning_rate=sched)  # params: nnx.State of nnx.Param (with `logical_axes`)

Muon runs per logically independent matrix: the stacked-layer dims (leading dims beyond `logical_axes`) and
leading "experts" / "o_groups" axes are batch dims; of the rest, the first dim is the matrix's input (rows) and
the others flatten into its columns. AdamW takes the embedding, the head, RMSNorm weights, every mHC parameter,
the compressor `ape`, `attn_sink` and anything with fewer than two matrix dims.

Labels and matrix layouts are worked out once, from the metadata of `params`, and looked up by tree path at
update time, so the transformation works on the State of Variables, on the same tree of plain arrays (as
`nnx.Optimizer` and jit hand it over) and on `State.to_pure_dict()` trees.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

MUON, ADAMW, FROZEN = "muon", "adamw", "frozen"
# Leading logical axes that index independent matrices.
BATCH_AXES = ("experts", "o_groups")
# (a, b, c) of X <- aX + b(XXᵀ)X + c(XXᵀ)²X: 8 fast quintic steps, then 2 cubic steps that settle at 1.
NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
NS_EPS = 1e-7
ADAM_EPS_ROOT = 1e-36  # see build_optimizer


# ----- paths and metadata ---------------------------------------------------------------------------------------
def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _key(entry):
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def path_key(path) -> tuple:
  """A jax key path as a plain tuple (`('stacks', 0, 'units', ...)`), the same for State and pure dicts."""
  return tuple(_key(e) for e in path)


def _path_str(key: tuple) -> str:
  return "/".join(str(k) for k in key)


def _leaves(tree):
  """[(path tuple, leaf)] with nnx.Variables kept whole, and the treedef that rebuilds the tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)
  return [(path_key(p), x) for p, x in flat], treedef


def _value(x):
  return x[...] if _is_var(x) else x


class Layout(NamedTuple):
  """How a leaf splits into matrices: `batch` leading dims, then one row dim, then `ndim - batch - 1` column dims."""
  batch: int
  ndim: int

  @property
  def matrix_dims(self) -> int:
    return self.ndim - self.batch


def leaf_layout(key: tuple, leaf) -> Layout:
  """The matrix layout of one Param leaf from its `logical_axes` (extra leading dims are stacked layers)."""
  axes = leaf.get_metadata().get("logical_axes") if _is_var(leaf) else None
  shape = getattr(leaf, "shape", None)
  if axes is None or shape is None or len(axes) > len(shape):
    raise ValueError(f"parameter {_path_str(key)!r} has no usable `logical_axes` metadata (leaf "
                     f"{type(leaf).__name__}, shape {shape}, logical_axes {axes}); build the optimizer from the "
                     f"nnx.Param State of nnx.split(model, nnx.Param, ...)")
  batch = len(shape) - len(axes)
  for name in axes:
    if name not in BATCH_AXES:
      break
    batch += 1
  return Layout(batch, len(shape))


def _is_mhc(key: tuple) -> bool:
  return any(isinstance(k, str) and (k == "hc_head" or k.endswith("_hc")) for k in key)


def leaf_label(key: tuple, leaf) -> str:
  """"adamw" or "muon" for one Param leaf (spec §12; 1-D and odd tensors to AdamW as the spec infers)."""
  layout = leaf_layout(key, leaf)
  name = key[-1] if key else None
  axes = tuple(leaf.get_metadata()["logical_axes"])
  if (key in (("embed",), ("head",)) or _is_mhc(key) or name in ("ape", "attn_sink") or axes == ("norm",)
      or (name == "weight" and len(key) > 1 and str(key[-2]).endswith("norm")) or layout.matrix_dims < 2):
    return ADAMW
  return MUON


def param_labels(params):
  """Same tree as `params` with "muon" or "adamw" in place of each Param."""
  return jax.tree_util.tree_map_with_path(lambda p, v: leaf_label(path_key(p), v), params, is_leaf=_is_var)


def _lookup(table: dict, key: tuple, what: str):
  try:
    return table[key]
  except KeyError:
    raise KeyError(f"{what}: no parameter {_path_str(key)!r} in the tree the optimizer was built from") from None


# ----- schedule -------------------------------------------------------------------------------------------------
def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int, decay_start: int,
                end_lr: float) -> optax.Schedule:
  """Linear warmup 0 → peak, constant peak until `decay_start`, cosine to `end_lr` at `total_steps`, then end."""
  if not 0 <= warmup_steps <= decay_start <= total_steps:
    raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= decay_start ({decay_start}) <= total_steps "
                     f"({total_steps})")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / max(warmup_steps, 1)
    frac = jnp.clip((step - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
    cosine = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup_steps, warm, jnp.where(step < decay_start, peak_lr, cosine))

  return schedule


# ----- Muon -----------------------------------------------------------------------------------------------------
def hybrid_newton_schulz(g_MN, dtype=jnp.bfloat16):
  """Approximate orthogonalisation U Vᵀ of each matrix over the last two dims; g's dtype out.

  Matmul inputs and the iterate are in `dtype` (spec: stable in bf16), accumulation and the a, b, c
  combinations in float32.

  X0 = G/(‖G‖_F + eps), then X <- aX + b(XXᵀ)X + c(XXᵀ)²X with NS_COEFFS; XXᵀ is taken on the smaller side.
  """
  out_dtype = g_MN.dtype
  tall = g_MN.shape[-2] > g_MN.shape[-1]
  x = jnp.swapaxes(g_MN, -1, -2) if tall else g_MN
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True))
  x = (x32 / (norm + NS_EPS)).astype(dtype)
  prec = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
  mm = lambda spec, u, v: jnp.einsum(spec, u, v, precision=prec, preferred_element_type=jnp.float32)

  def step(x_MN, abc):  # matmul inputs in `dtype`, float32 accumulation and coefficient arithmetic
    a_MM = mm("...mn,...kn->...mk", x_MN, x_MN)
    p_MM = abc[1] * a_MM + abc[2] * mm("...mk,...kl->...ml", a_MM.astype(dtype), a_MM.astype(dtype))
    x_MN = abc[0] * x_MN.astype(jnp.float32) + mm("...mk,...kn->...mn", p_MM.astype(dtype), x_MN)
    return x_MN.astype(dtype), None

  x, _ = jax.lax.scan(step, x, jnp.asarray(NS_COEFFS, jnp.float32))
  x = jnp.swapaxes(x, -1, -2) if tall else x
  return x.astype(out_dtype)


def muon_direction(m_X, layout: Layout, *, rms: float, ns_dtype):
  """O = HybridNS(M)·sqrt(max(rows, cols))·rms per matrix of one leaf (M already Nesterov-combined)."""
  shape = m_X.shape
  rows = shape[layout.batch]
  cols = math.prod(shape[layout.batch + 1:])
  m_BMN = m_X.reshape(shape[:layout.batch] + (rows, cols))
  o_BMN = hybrid_newton_schulz(m_BMN, ns_dtype) * (math.sqrt(max(rows, cols)) * rms)
  return o_BMN.reshape(shape).astype(m_X.dtype)


class MuonState(NamedTuple):
  momentum: Any  # same tree as the muon params, plain arrays


def scale_by_muon(layouts: dict, *, momentum: float = 0.95, rms: float = 0.18,
                  ns_dtype=jnp.bfloat16) -> optax.GradientTransformation:
  """M <- μM + G; update = HybridNS(μM + G)·sqrt(max(n, m))·rms. `layouts`: path tuple -> Layout."""

  def init_fn(params):
    leaves, treedef = _leaves(params)
    return MuonState(treedef.unflatten([jnp.zeros_like(_value(x)) for _, x in leaves]))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = _leaves(updates)
    moms = treedef.flatten_up_to(state.momentum)
    new_u, new_m = [], []
    for (key, g), m in zip(leaves, moms):
      g_X = _value(g)
      m = (momentum * m + g_X).astype(m.dtype)
      o = muon_direction(momentum * m + g_X, _lookup(layouts, key, "muon"), rms=rms, ns_dtype=ns_dtype)
      new_u.append(g.replace(o) if _is_var(g) else o)
      new_m.append(m)
    return treedef.unflatten(new_u), MuonState(treedef.unflatten(new_m))

  return optax.GradientTransformation(init_fn, update_fn)


# ----- the hybrid optimizer -------------------------------------------------------------------------------------
def _trainable_table(trainable, keys) -> dict:
  if trainable is None:
    return {k: True for k in keys}
  if callable(trainable):
    return {k: bool(trainable(k)) for k in keys}
  leaves, _ = _leaves(trainable)
  table = {k: bool(_value(x)) for k, x in leaves}
  missing = [k for k in keys if k not in table]
  if missing:
    raise ValueError(f"`trainable` has no entry for parameter {_path_str(missing[0])!r}")
  return table


def build_optimizer(params, learning_rate, *, weight_decay: float = 0.1, muon_momentum: float = 0.95,
                    muon_rms: float = 0.18, adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-20,
                    ns_dtype=jnp.bfloat16,
                    trainable: Any | Callable[[tuple], bool] | None = None) -> optax.GradientTransformation:
  """Muon + AdamW over `params` (an nnx.State of Params), both with decoupled decay and the same lr.

  `trainable`: None (all), a same-structure tree of bools, or a callable on the path tuple
  (`('stacks', 0, 'units', 'blocks', 0, 'attn', 'wq_a')`); frozen leaves get exactly-zero updates and no state.
  """
  leaves, _ = _leaves(params)
  labels = {k: leaf_label(k, x) for k, x in leaves}
  layouts = {k: leaf_layout(k, x) for k, x in leaves if labels[k] == MUON}
  train = _trainable_table(trainable, labels)
  labels = {k: (lab if train[k] else FROZEN) for k, lab in labels.items()}

  def label_fn(tree):
    return jax.tree_util.tree_map_with_path(lambda p, _: _lookup(labels, path_key(p), "labels"), tree,
                                            is_leaf=_is_var)

  muon = optax.chain(
      scale_by_muon(layouts, momentum=muon_momentum, rms=muon_rms, ns_dtype=ns_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
  # eps_root: XLA flushes float32 subnormals to zero, so the second moment (1 - b2)·g² becomes exactly 0 for
  # |g| < ~5e-19 and, with eps = 1e-20, the step g / eps reached ~50·lr (rounding noise of a near-zero gradient
  # blown up). A floor in the normal range under the square root caps that step at ~0.5·lr.
  adamw = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps, eps_root=ADAM_EPS_ROOT,
                      weight_decay=weight_decay)
  return optax.multi_transform({MUON: muon, ADAMW: adamw, FROZEN: optax.set_to_zero()}, label_fn)
