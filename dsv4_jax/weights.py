"""Official / HF safetensors checkpoints <-> model state, streamed tensor by tensor onto the model's shardings.

  model, cfg = load_pretrained("ckpt_dir", dtype="bfloat16", mesh=None)
  save_pretrained(model, cfg, "out_dir")                  # the same format back, unquantized
  load_official_state(model, {"embed.weight": ..., ...})  # in-memory official tensors (parity tests)

Loading checks everything it can from the headers first (names, shapes, quantized storage, hash tables) and
fails with one error listing the problems, before anything is allocated. Then the model is built abstractly,
its stacked variables are allocated as zeros directly on their shardings, and each official tensor is read,
dequantized (FP8 128x128 blocks or FP4 nibble pairs, told by its `.scale` and its dtype) and cast on the host,
then laid out as ours (`official_names.to_ours`, on device where transposes are cheap) and written into its
slot. Host memory stays about PREFETCH tensors (read ahead by worker threads), never a stacked variable.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import math
import os
import shutil
import uuid
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dsv4_jax.config import RUNTIME_KEY, ModelConfig
from dsv4_jax.model.quant import FP4_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK, dequant_fp4_packed, dequant_fp8_blocks
from dsv4_jax.model.transformer import DeepSeekV4
from dsv4_jax.official_names import TensorSpec, official_tensors, to_official, to_ours
from dsv4_jax.safetensors_io import CODES, CheckpointFiles, write_sharded

# Tensors read and dequantized ahead by worker threads; host memory is about this many tensors.
PREFETCH = min(8, os.cpu_count() or 1)
MAX_LISTED = 10  # problems of each kind listed in one CheckpointError

_FLOATS = {np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)}
_INTS = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)}
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_SCALES = {np.dtype(ml_dtypes.float8_e8m0fnu), np.dtype(np.uint8), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors, bad hash tables."""


class Source(NamedTuple):
  spec: TensorSpec
  kind: str  # "plain" | "fp8" | "fp4"
  scale: str | None  # name of the `.scale` tensor for fp8 / fp4


# ----- validation (headers only) ---------------------------------------------------------------------------
def _fmt(shape) -> str:
  return "[" + ", ".join(str(d) for d in shape) + "]"


def _code(dtype) -> str:
  return CODES.get(np.dtype(dtype), str(dtype))


def _scale_name(name: str) -> str | None:
  return name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None


def plan_sources(specs: list[TensorSpec], entries: Mapping[str, tuple[np.dtype, tuple]],
                 var_dtypes: Mapping[tuple, np.dtype], where: str) -> list[Source]:
  """How to read each official tensor from `entries` (name -> (dtype, shape)); raises CheckpointError with every
  missing, unexpected, mis-shaped or mis-typed tensor (official and stored shapes side by side)."""
  problems: list[tuple[str, str]] = []
  sources, claimed = [], set()
  for spec in specs:
    name, shape = spec.name, spec.shape
    sname = _scale_name(name)
    quantizable = spec.fp8_in_release or spec.expert
    if sname in entries and quantizable:
      claimed.add(sname)
    if name not in entries:
      problems.append(("missing", f"{name}: expected {_fmt(shape)}"))
      continue
    claimed.add(name)
    wdt, wshape = np.dtype(entries[name][0]), tuple(entries[name][1])
    if sname in entries and quantizable:
      sdt, sshape = np.dtype(entries[sname][0]), tuple(entries[sname][1])
      if sdt not in _SCALES:
        problems.append(("wrong dtype", f"{sname}: {_code(sdt)} is not a ue8m0 scale (F8_E8M0, U8 or F32)"))
      if wdt == _E4M3:
        want_s = tuple(-(-d // FP8_WEIGHT_BLOCK) for d in shape)
        if wshape != shape:
          problems.append(("wrong shape", f"{name}: expected {_fmt(shape)} (FP8), checkpoint has {_fmt(wshape)}"))
        elif sshape != want_s:
          problems.append(("wrong shape", f"{sname}: expected {_fmt(want_s)} (128x128 blocks of FP8 {name} "
                                          f"{_fmt(shape)}), checkpoint has {_fmt(sshape)}"))
        sources.append(Source(spec, "fp8", sname))
      elif wdt in (np.dtype(np.int8), np.dtype(np.uint8)) and spec.expert:
        out, inp = shape
        want_w, want_s = (out, inp // 2), (out, inp // FP4_WEIGHT_BLOCK)
        if inp % FP4_WEIGHT_BLOCK or wshape != want_w:
          problems.append(("wrong shape", f"{name}: expected int8 {_fmt(want_w)} (FP4 pairs of official "
                                          f"{_fmt(shape)}), checkpoint has {_fmt(wshape)}"))
        elif sshape != want_s:
          problems.append(("wrong shape", f"{sname}: expected {_fmt(want_s)} (1x32 blocks of FP4 {name} "
                                          f"{_fmt(shape)}), checkpoint has {_fmt(sshape)}"))
        sources.append(Source(spec, "fp4", sname))
      else:
        allowed = "F8_E4M3 (FP8)" + (" or I8 (FP4 pairs)" if spec.expert else "")
        problems.append(("wrong dtype", f"{name}: {_code(wdt)} {_fmt(wshape)} beside a .scale; expected {allowed}"))
      continue
    is_int = np.dtype(var_dtypes[spec.path]) in _INTS
    if wdt == _E4M3:
      problems.append(("wrong dtype", f"{name}: FP8 {_fmt(wshape)} without its scale {sname}"))
    elif wdt not in (_INTS if is_int else _FLOATS):
      kind = "an integer" if is_int else "a float"
      problems.append(("wrong dtype", f"{name}: {_code(wdt)} {_fmt(wshape)}, expected {kind} tensor {_fmt(shape)}"))
    elif wshape != shape:
      problems.append(("wrong shape", f"{name}: expected {_fmt(shape)}, checkpoint has {_fmt(wshape)}"))
    else:
      sources.append(Source(spec, "plain", None))
  official = {s.name for s in specs}
  for name in entries:
    if name not in claimed:
      dt, shape = entries[name]
      hint = ""
      if name.endswith(".scale") and name[: -len(".scale")] + ".weight" in official:
        hint = " (a scale for a tensor that the release never quantizes)"
      problems.append(("unexpected", f"{name}: {_code(dt)} {_fmt(shape)}{hint}"))
  if problems:
    by_kind: dict[str, list[str]] = {}
    for kind, text in problems:
      by_kind.setdefault(kind, []).append(text)
    lines = []
    for kind, texts in by_kind.items():
      lines += [f"  {kind}: {text}" for text in texts[:MAX_LISTED]]
      if len(texts) > MAX_LISTED:
        lines.append(f"  ... and {len(texts) - MAX_LISTED} more {kind}")
    summary = ", ".join(f"{len(texts)} {kind}" for kind, texts in by_kind.items())
    raise CheckpointError(f"checkpoint {where} does not match the model of its config ({summary}):\n"
                          + "\n".join(lines))
  return sources


def check_hash_tables(sources: list[Source], get: Callable[[str], np.ndarray], n_experts: int) -> None:
  """Every `tid2eid` row must name distinct experts in [0, n_experts): the official MoE applies a repeated
  expert once and HF transformers twice (spec §20), so refuse rather than pick one."""
  problems = []
  for src in sources:
    name = src.spec.name
    if not name.endswith(".gate.tid2eid"):
      continue
    layer = name[: -len(".ffn.gate.tid2eid")]
    t = np.asarray(get(name))
    bad = (t < 0) | (t >= n_experts)
    if bad.any():
      tok = int(np.argwhere(bad)[0][0])
      problems.append(f"{name} ({layer}): token {tok} routes to expert id(s) outside [0, {n_experts}): "
                      f"{t[tok].tolist()} ({int(bad.any(axis=1).sum())} token(s) affected)")
      continue
    s = np.sort(t, axis=1)
    dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
    if dup.any():
      tok = int(np.argmax(dup))
      problems.append(f"{name} ({layer}): token {tok} lists an expert more than once: {t[tok].tolist()} "
                      f"({int(dup.sum())} token(s) affected)")
  if problems:
    raise CheckpointError("hash routing table(s) with repeated or out-of-range experts; the official MoE applies a "
                          "repeated expert once and HF transformers twice (spec §20), so this is refused:\n  "
                          + "\n  ".join(problems))


def check_coverage(specs: list[TensorSpec], shapes: Mapping[tuple, tuple]) -> None:
  """Every variable is filled exactly by the official tensors (guards official_names against the model)."""
  seen: dict[tuple, set] = {}
  for s in specs:
    seen.setdefault(s.path, set()).add(s.index)
  bad = [p for p in seen if p not in shapes]
  for path, shape in shapes.items():
    idx = seen.get(path, set())
    n = len(next(iter(idx))) if idx else 0
    if len(idx) != math.prod(shape[:n]) or any(len(i) != n for i in idx):
      bad.append(path)
  if bad:
    raise RuntimeError("official_tensors does not cover the model's variables exactly (a bug in "
                       f"official_names.py or an unsupported config): {', '.join('/'.join(map(str, p)) for p in bad)}")


# ----- streaming onto devices ------------------------------------------------------------------------------
def official_value(src: Source, get: Callable[[str], np.ndarray], dtype) -> np.ndarray:
  """One official tensor, dequantized and cast to `dtype`, still in the official layout (host)."""
  w = get(src.spec.name)
  if src.kind == "fp8":
    w = dequant_fp8_blocks(w, get(src.scale))
  elif src.kind == "fp4":
    w = dequant_fp4_packed(w, get(src.scale))
  return np.asarray(w).astype(dtype, copy=False)


def _prefetched(fn: Callable, items: list, depth: int):
  """Yields (item, fn(item)) in order, computing up to `depth` ahead in threads (numpy releases the GIL)."""
  if depth <= 1:
    yield from ((item, fn(item)) for item in items)
    return
  with concurrent.futures.ThreadPoolExecutor(depth) as pool:
    pending = collections.deque()
    for item in items:
      pending.append((item, pool.submit(fn, item)))
      if len(pending) >= depth:
        first, future = pending.popleft()
        yield first, future.result()
    while pending:
      first, future = pending.popleft()
      yield first, future.result()


def _allocate(shapes: Mapping[tuple, jax.ShapeDtypeStruct], shardings: Mapping[tuple, jax.sharding.Sharding]):
  """Zeros for the given variables, created directly on their shardings (one jit, no host copy)."""
  paths = list(shapes)
  if not paths:
    return {}
  zeros = jax.jit(lambda: [jnp.zeros(shapes[p].shape, shapes[p].dtype) for p in paths],
                  out_shardings=[shardings[p] for p in paths])
  return dict(zip(paths, zeros()))


def _put(x: np.ndarray, sharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _replicated(sharding):
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P())
  return sharding  # single device


@functools.lru_cache(maxsize=256)  # jit objects reused across loads: their compilations are kept
def _placer(sharding, n_lead: int, layout: tuple):
  """A jitted (variable, official value, index) -> variable that lays the value out as ours (`to_ours`, on
  device: large host transposes are slow) and writes it into slot `index` (donating the old variable)."""
  if not n_lead:
    return jax.jit(lambda x, value, idx: to_ours(value, layout), out_shardings=sharding)

  def place(x, value, idx):
    value = to_ours(value, layout)
    starts = [idx[i] for i in range(n_lead)] + [0] * value.ndim
    return jax.lax.dynamic_update_slice(x, value.reshape((1,) * n_lead + value.shape), starts)

  return jax.jit(place, donate_argnums=0, out_shardings=sharding)


def stream(sources: list[Source], get: Callable[[str], np.ndarray], shapes: Mapping[tuple, jax.ShapeDtypeStruct],
           shardings: Mapping[tuple, jax.sharding.Sharding], advance: Callable[[Source], None] = lambda s: None):
  """Reads every source into its variable on device; returns {path: jax.Array} for every variable."""
  stacked = {s.spec.path for s in sources if s.spec.index}
  arrays = _allocate({p: shapes[p] for p in stacked}, shardings)
  ours_shapes = {}
  read = lambda src: official_value(src, get, shapes[src.spec.path].dtype)  # noqa: E731
  for src, x in _prefetched(read, sources, PREFETCH):
    spec, var = src.spec, shapes[src.spec.path]
    n, key = len(spec.index), (x.shape, x.dtype, spec.layout)
    if key not in ours_shapes:
      ours_shapes[key] = jax.eval_shape(lambda v: to_ours(v, spec.layout), jax.ShapeDtypeStruct(x.shape, x.dtype))
    if ours_shapes[key].shape != var.shape[n:]:
      raise RuntimeError(f"{spec.name}: to_ours gives {_fmt(ours_shapes[key].shape)}, the slot of variable "
                         f"{'/'.join(map(str, spec.path))} is {_fmt(var.shape[n:])} (a bug in official_names.py)")
    sharding = shardings[spec.path]
    place = _placer(sharding, n, spec.layout)
    arrays[spec.path] = place(arrays.get(spec.path), _put(x, _replicated(sharding)), np.asarray(spec.index, np.int32))
    arrays[spec.path].block_until_ready()  # bounds the host buffers in flight
    advance(src)
  return arrays


# ----- public API ------------------------------------------------------------------------------------------
def _default_shardings(abstract_state, mesh):
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {p: device for p, _ in nnx.to_flat_state(abstract_state)}
  from dsv4_jax.sharding import state_shardings  # noqa: PLC0415

  return {p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(abstract_state, mesh))}


def load_pretrained(path, dtype="bfloat16", mesh=None, *, progress: bool = True, **config_overrides):
  """Loads an official (or save_pretrained) checkpoint directory; returns (model, config used).

  `dtype` sets both the parameter storage dtype (`param_dtype`) and the compute dtype (`dtype`); None keeps
  what config.json says (ModelConfig defaults: float32 storage, bfloat16 compute). Variables the official code
  keeps in float32 (mHC, attention sink, ape, router bias) stay float32. `config_overrides` are ModelConfig
  fields and win over both. With `mesh`, every parameter is placed on its `state_shardings` sharding.
  """
  path = os.fspath(path)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"no config.json in {path!r}: not a checkpoint directory")
  if dtype is not None:
    config_overrides = {"param_dtype": dtype, "dtype": dtype, **config_overrides}
  cfg = ModelConfig.from_hf(path, **config_overrides)
  files = CheckpointFiles(path)
  abstract_model = nnx.eval_shape(lambda: DeepSeekV4(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  shapes = {p: v.get_value() for p, v in nnx.to_flat_state(abstract_state)}
  specs = official_tensors(abstract_model)
  check_coverage(specs, {p: s.shape for p, s in shapes.items()})
  entries = {n: (i.dtype, i.shape) for n, i in files.infos.items()}
  sources = plan_sources(specs, entries, {p: s.dtype for p, s in shapes.items()}, repr(path))
  check_hash_tables(sources, files.get, cfg.n_routed_experts)
  file_order = {fn: i for i, fn in enumerate(files.files)}
  info = files.infos
  sources.sort(key=lambda s: (file_order[os.path.basename(info[s.spec.name].file)], info[s.spec.name].start))
  shardings = _default_shardings(abstract_state, mesh)
  nbytes = {s.spec.name: info[s.spec.name].nbytes + (info[s.scale].nbytes if s.scale else 0) for s in sources}
  with tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
    arrays = stream(sources, files.get, shapes, shardings, lambda s: bar.update(nbytes[s.spec.name]))
  state = nnx.from_flat_state([(p, v.replace(arrays[p])) for p, v in nnx.to_flat_state(abstract_state)])
  return nnx.merge(graphdef, state), cfg


def load_official_state(model, tensors: Mapping[str, np.ndarray], *, prefix: str = "") -> None:
  """Replaces every parameter of `model` with official tensors held in memory (name -> array, quantized or
  not; keys starting with `prefix`, stripped, e.g. "param/" for golden .npz files). Validated as
  load_pretrained; the new values keep each variable's current sharding."""
  entries = {k[len(prefix):]: np.asarray(v) for k, v in tensors.items() if k.startswith(prefix)}
  state = nnx.state(model)
  current = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
  shapes = {p: jax.ShapeDtypeStruct(x.shape, x.dtype) for p, x in current.items()}
  specs = official_tensors(model)
  check_coverage(specs, {p: s.shape for p, s in shapes.items()})
  sources = plan_sources(specs, {k: (v.dtype, v.shape) for k, v in entries.items()},
                         {p: s.dtype for p, s in shapes.items()}, "(in-memory tensors)")
  check_hash_tables(sources, entries.__getitem__, model.cfg.n_routed_experts)
  arrays = stream(sources, entries.__getitem__, shapes, {p: x.sharding for p, x in current.items()})
  nnx.update(model, nnx.from_flat_state([(p, v.replace(arrays[p])) for p, v in nnx.to_flat_state(state)]))


def _hf_without_runtime(cfg: ModelConfig) -> dict:
  d = cfg.to_hf(quantized=False)
  d.pop(RUNTIME_KEY, None)
  return d


def save_pretrained(model, config: ModelConfig, path, *, max_shard_bytes: int = 4 << 30, overwrite: bool = False,
                    progress: bool = True) -> None:
  """Writes `config.json` (unquantized) and every tensor under its official name and layout, in the
  parameters' dtype (tid2eid int64 as the release), as safetensors shards of at most `max_shard_bytes` plus
  `model.safetensors.index.json`. Written into a temporary directory beside `path`, then renamed into place;
  an existing non-empty `path` is replaced only with `overwrite=True`. Single-process (gathers to the host)."""
  path = os.path.abspath(os.fspath(path))
  mine, theirs = _hf_without_runtime(model.cfg), _hf_without_runtime(config)
  if mine != theirs:
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    raise ValueError(f"config differs from the model's config in: {', '.join(diff)}")
  if os.path.lexists(path):
    if not os.path.isdir(path):
      raise FileExistsError(f"{path} exists and is not a directory")
    if os.listdir(path) and not overwrite:
      raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:12]}")
  os.mkdir(tmp)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config.to_hf(quantized=False), f, indent=2)
    values = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    specs = official_tensors(model)
    check_coverage(specs, {p: x.shape for p, x in values.items()})
    by_name = {s.name: s for s in specs}
    items = [(s.name, np.int64 if s.layout[0] == "int32" else np.dtype(values[s.path].dtype), s.shape)
             for s in specs]

    def get(name):
      s = by_name[name]
      x = np.asarray(jax.device_get(_fetcher(len(s.index), s.layout)(values[s.path], np.asarray(s.index, np.int32))))
      return x.astype(np.int64) if s.layout[0] == "int32" else x  # int64 as the release (no x64 on device)

    total = sum(math.prod(shape) * np.dtype(dt).itemsize for _, dt, shape in items)
    with tqdm(total=total, unit="B", unit_scale=True, desc="saving", disable=not progress) as bar:
      write_sharded(tmp, items, get, max_shard_bytes, bar.update)
    _move_into_place(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@functools.lru_cache(maxsize=256)
def _fetcher(n_lead: int, layout: tuple):
  """A jitted (variable, index) -> slot `index` in the official layout (`to_official`, on device)."""
  def fetch(x, idx):
    for i in range(n_lead):
      x = jax.lax.dynamic_index_in_dim(x, idx[i], axis=0, keepdims=False)
    return x if layout[0] == "int32" else to_official(x, layout)

  return jax.jit(fetch)


def _move_into_place(tmp: str, path: str) -> None:
  """Renames `tmp` to `path`; an existing non-empty `path` is moved aside first and deleted after."""
  if not (os.path.isdir(path) and os.listdir(path)):
    os.replace(tmp, path)  # new, or an empty directory
    return
  old = f"{tmp}.old"
  os.rename(path, old)
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(old, path)
    raise
  shutil.rmtree(old, ignore_errors=True)
