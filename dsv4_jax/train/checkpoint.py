"""Training checkpoints: orbax CheckpointManager with a NaN guard, JSON side items and a resume check.

One step directory holds three items: `state` (any pytree of arrays, restored straight onto the caller's
shardings), `data` (the data-iterator state, JSON) and `meta` (model / train config, JSON). Orbax writes each step
into `<step>.orbax-checkpoint-tmp-*` and renames it when complete (local/POSIX file systems; object stores use a
commit file), so a crashed save never shows up as a step.

  ckpt = Checkpointer(directory, keep=3)
  ckpt.save(step, state, data_state=it.get_state(), meta=meta)
  check_compatible(ckpt.read_meta(), meta, critical_train_keys=("global_batch", "seq_len"))
  state, data_state, meta = ckpt.restore(abstract_state=abstract)
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_MAX_LISTED = 20  # mismatching leaves listed in one error


class NonFiniteState(ValueError):
  """The state to save has a NaN or Inf in a floating leaf."""


class IncompatibleCheckpoint(ValueError):
  """A checkpoint does not fit the current run (config fields, or the state's structure/shapes/dtypes)."""

  def __init__(self, message: str, differences: list[str]):
    super().__init__(message)
    self.differences = differences


class CheckpointNotFound(FileNotFoundError):
  """No checkpoint at all, or not at the requested step."""


class _QuietOrbax(logging.Filter):
  """Drops orbax's INFO chatter (several lines per save) from the absl logger; warnings pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


if not any(isinstance(f, _QuietOrbax) for f in logging.getLogger("absl").filters):
  logging.getLogger("absl").addFilter(_QuietOrbax())


# ----- pytree paths ---------------------------------------------------------------------------------------------
def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_name(path) -> str:
  """`params.layers.0.attn.wq.value`: the leaf's name as orbax stores it."""
  return ".".join(_key_name(k) for k in path) or "<root>"


def _named_leaves(tree) -> list[tuple[str, Any]]:
  return [(_path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ----- NaN guard -------------------------------------------------------------------------------------------------
@jax.jit
def _finite_flags(xs):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])


def _is_float(x) -> bool:
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    return isinstance(x, float)
  return not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and jnp.issubdtype(dtype, jnp.inexact)


def _check_finite(state) -> None:
  """Raises NonFiniteState naming the first floating leaf (in tree order) with a NaN/Inf."""
  named = [(i, name, x) for i, (name, x) in enumerate(_named_leaves(state)) if _is_float(x)]
  bad: list[tuple[int, str]] = []
  groups: dict[frozenset, list[tuple[int, str, jax.Array]]] = {}
  for i, name, x in named:
    if isinstance(x, jax.Array):  # one jitted reduction per device set (leaves on different meshes can't mix)
      groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append((i, name, x))
    elif not np.all(np.isfinite(np.asarray(x))):
      bad.append((i, name))
  for group in groups.values():
    flags = np.asarray(_finite_flags([x for _, _, x in group]))
    bad += [(i, name) for (i, name, _), ok in zip(group, flags) if not ok]
  if bad:
    bad.sort()
    more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
    raise NonFiniteState(f"refusing to checkpoint a state with NaN/Inf: leaf {bad[0][1]}{more}")


# ----- state structure check before restore ----------------------------------------------------------------------
def _stored_form(x) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) as stored: typed PRNG keys are stored as their uint32 key data."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return tuple(x.shape), np.dtype(x.dtype)


def _structure_problems(saved_tree, abstract) -> list[str]:
  """Leaves missing on either side, and shape/dtype differences (orbax would silently cast dtypes)."""
  saved = dict(_named_leaves(saved_tree))
  wanted = dict(_named_leaves(abstract))
  problems = [f"{n}: in the checkpoint, not in abstract_state" for n in saved if n not in wanted]
  problems += [f"{n}: in abstract_state, not in the checkpoint" for n in wanted if n not in saved]
  for name, want in wanted.items():
    have = saved.get(name)
    if have is None or getattr(have, "shape", None) is None:
      continue
    (want_shape, want_dtype), have_shape, have_dtype = _stored_form(want), tuple(have.shape), np.dtype(have.dtype)
    if (want_shape, want_dtype) != (have_shape, have_dtype):
      problems.append(f"{name}: saved {have_dtype}{list(have_shape)}, now {want_dtype}{list(want_shape)}")
  return problems


def _default_sharding(abstract):
  """Leaves without a sharding on the first local device: orbax would use the saved sharding, which fails when
  the device count changed."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def fill(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device, weak_type=x.weak_type)
    return x
  return jax.tree.map(fill, abstract)


# ----- resume compatibility ----------------------------------------------------------------------------------
def _jsonish(x):
  """Tuples as lists (JSON turns tuples into lists), recursively."""
  if isinstance(x, (list, tuple)):
    return [_jsonish(v) for v in x]
  if isinstance(x, dict):
    return {k: _jsonish(v) for k, v in x.items()}
  return x


_ABSENT = object()


def _show(x) -> str:
  return "<absent>" if x is _ABSENT else repr(x)


def check_compatible(saved_meta: dict, current_meta: dict, *, critical_train_keys: Iterable[str]) -> None:
  """Raises IncompatibleCheckpoint listing every differing field: all of meta["model"], and the
  critical_train_keys of meta["train"] (the other train fields, e.g. steps or log_every, may change on resume)."""
  differences = []
  sections = [("model", None), ("train", tuple(critical_train_keys))]
  for section, keys in sections:
    saved, now = saved_meta.get(section) or {}, current_meta.get(section) or {}
    if keys is None:
      keys = list(saved) + [k for k in now if k not in saved]
    for key in keys:
      a, b = _jsonish(saved.get(key, _ABSENT)), _jsonish(now.get(key, _ABSENT))
      if a is _ABSENT and b is _ABSENT:
        continue
      if a is _ABSENT or b is _ABSENT or a != b:
        differences.append(f"{section}.{key}: saved {_show(a)}, now {_show(b)}")
  if differences:
    raise IncompatibleCheckpoint(
      f"checkpoint does not match the current run ({len(differences)} fields differ):\n  "
      + "\n  ".join(differences), differences)


# ----- the manager -----------------------------------------------------------------------------------------------
def _json_ready(name: str, value) -> None:
  if not isinstance(value, dict):
    raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} is not JSON-serialisable: {e}") from e


class Checkpointer:
  """Numbered training checkpoints under `directory`, keeping the newest `keep` (None: all).

  With async_save the arrays are copied to host before save() returns and written in the background; the next
  save / restore / read_meta / wait / close waits for that write (and raises its error, if any).
  """

  def __init__(self, directory, keep: int | None = 3, async_save: bool = True):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None, got {keep}")
    self.directory = epath.Path(directory)
    state_handler = ocp.StandardCheckpointHandler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, state_handler)
    registry.add("state", ocp.args.StandardRestore, state_handler)
    for item in ("data", "meta"):
      json_handler = ocp.JsonCheckpointHandler()
      registry.add(item, ocp.args.JsonSave, json_handler)
      registry.add(item, ocp.args.JsonRestore, json_handler)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

  # --- steps
  def all_steps(self) -> list[int]:
    """Saved steps, ascending (including one whose async write is still in flight)."""
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def _resolve(self, step: int | None) -> int:
    self.wait()
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFound(f"no checkpoint in {self.directory}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointNotFound(f"no checkpoint for step {step} in {self.directory}; existing steps: {steps}")
    return step

  # --- save / restore
  def save(self, step: int, state, *, data_state: dict, meta: dict) -> bool:
    """Starts writing `state` + the JSON items as `step`; False if orbax skips it (step not after the latest).

    Raises NonFiniteState (before touching anything on disk) if a floating leaf holds NaN/Inf.
    """
    _json_ready("data_state", data_state)
    _json_ready("meta", meta)
    _check_finite(state)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))
    return bool(self._mngr.save(int(step), args=args))

  def restore(self, step: int | None = None, *, abstract_state):
    """(state, data_state, meta) of `step` (None: the latest), arrays placed on abstract_state's shardings.

    abstract_state: the saved pytree's structure with jax.ShapeDtypeStruct leaves (shape, dtype, sharding); a
    leaf without a sharding goes to the first local device (not to the sharding it was saved with).
    Raises IncompatibleCheckpoint naming each leaf missing on either side or differing in shape/dtype.
    """
    step = self._resolve(step)
    saved = self._mngr.item_metadata(step)["state"]
    problems = _structure_problems(getattr(saved, "tree", saved), abstract_state)
    if problems:
      listed = problems[:_MAX_LISTED] + ([f"... {len(problems) - _MAX_LISTED} more"]
                                         if len(problems) > _MAX_LISTED else [])
      raise IncompatibleCheckpoint(
        f"step {step} in {self.directory} does not fit abstract_state ({len(problems)} problems):\n  "
        + "\n  ".join(listed), problems)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(_default_sharding(abstract_state)), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    out = self._mngr.restore(step, args=args)
    return out["state"], out["data"], out["meta"]

  def read_meta(self, step: int | None = None) -> dict:
    """The meta item of `step` (None: the latest), reading nothing else."""
    step = self._resolve(step)
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def delete_after(self, step: int) -> list[int]:
    """Deletes every checkpoint after `step` (e.g. a trajectory abandoned by a rollback); returns their steps."""
    self.wait()
    dropped = [s for s in self.all_steps() if s > step]
    for s in dropped:
      self._mngr.delete(s)
    return dropped

  # --- lifecycle
  def wait(self) -> None:
    """Blocks until an in-flight async save is committed (raises its error, if it failed)."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
