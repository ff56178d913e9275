"""unstack_layers: a scanned model as the same model with one parameter set per main layer (scan_layers=False).

Why: the cached decode step scans each layer stack over its stacked parameters, and each iteration slices its
layer's weights out of the stack; for the routed experts (cuBLAS `ragged_dot` custom calls) XLA materializes
those slices as device-to-device copies every step. On an H200 (6-layer Flash-shaped bench model, 128K context,
batch 64; experiments/profile_decode.py) that is ~4.6 ms of copies: 20.19 ms per step scanned, 16.04 ms with
scan_layers=False. Training keeps the scan (compile time that does not grow with depth).

  served = unstack_layers(model)        # a copy of the main layers; `model` is unchanged and still usable

Loading a checkpoint for serving needs no copy: load_pretrained(path, scan_layers=False) reads every layer
straight into its own parameters.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv4_jax.model.transformer import DeepSeekV4

_STACK = "stacks"  # flat-state paths of main-layer parameters: ("stacks", s, "units", "blocks", pos, ...)


def unstack_layers(model: DeepSeekV4) -> DeepSeekV4:
  """The same model with cfg.scan_layers=False: main layer L is its own stack (repeats 1) holding slice `rep`
  of the stacked parameters at `model.layer_location(L)`; every other variable (embedding, head, norms, MTP
  block(s)) is the very same array, shared.

  A copy of the main layers: until `model` is dropped, their parameters take twice the memory (on the devices
  they live on: each slice keeps its source's sharding, less any split of the stacked axis; nothing goes
  through the host). Stacks with one repeat are shared, not copied. A model that is already unstacked
  (cfg.scan_layers False) is returned as is.
  """
  if not isinstance(model, DeepSeekV4):
    raise TypeError(f"unstack_layers takes a DeepSeekV4 model, got {type(model).__name__}")
  cfg = model.cfg
  if not cfg.scan_layers:
    return model
  flat_cfg = cfg.replace(scan_layers=False)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DeepSeekV4(flat_cfg, rngs=nnx.Rngs(0))))
  source = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
  # Each target variable: its source path and, for a main-layer parameter, the repeat it is sliced from.
  where: dict[tuple, tuple[tuple, int | None]] = {}
  for path, var in nnx.to_flat_state(abstract):
    if path[0] == _STACK:
      layer, rest = path[1], path[5:]  # ("stacks", layer, "units", "blocks", 0, ...)
      s, rep, pos = model.layer_location(layer)
      where[path] = ((_STACK, s, "units", "blocks", pos) + rest, rep)
    else:
      where[path] = (path, None)
  _check(model, abstract, source, where)
  # Slices of stacks with repeats > 1, in one compiled program (each output on its source's sharding).
  sliced = [(path, src, rep) for path, (src, rep) in where.items()
            if rep is not None and source[src].shape[0] > 1]
  inputs = sorted({src for _, src, _ in sliced}, key=str)
  index = {src: i for i, src in enumerate(inputs)}
  values = {path: source[src] for path, (src, _) in where.items()}
  if sliced:
    cut = jax.jit(lambda xs: [xs[index[src]][rep:rep + 1] for _, src, rep in sliced],
                  out_shardings=[_slice_sharding(source[src]) for _, src, _ in sliced])
    values.update(zip([path for path, _, _ in sliced], cut([source[src] for src in inputs])))
  state = nnx.from_flat_state([(path, var.replace(values[path])) for path, var in nnx.to_flat_state(abstract)])
  return nnx.merge(graphdef, state)


def _check(model, abstract, source, where) -> None:
  """Every target variable has a source of the right shape and dtype, and every source variable is used."""
  problems = []
  for path, var in nnx.to_flat_state(abstract):
    src, rep = where[path]
    name = "/".join(map(str, src))
    if src not in source:
      problems.append(f"{name}: missing (needed for {'/'.join(map(str, path))})")
      continue
    x = source[src]
    want = var.get_value()
    if rep is not None:
      repeats = model.plan[src[1]][1]
      ok = x.shape == (repeats,) + tuple(want.shape[1:])
      expected = f"[{repeats}, {', '.join(map(str, want.shape[1:]))}] (stack {src[1]} has {repeats} repeats)"
    else:
      ok = tuple(x.shape) == tuple(want.shape)
      expected = f"{list(want.shape)}"
    if not ok or x.dtype != want.dtype:
      problems.append(f"{name}: expected {want.dtype} {expected}, model has {x.dtype} {list(x.shape)}")
  unused = set(source) - {src for src, _ in where.values()}
  problems += [f"{'/'.join(map(str, p))}: not a variable of a {model.cfg.num_hidden_layers}-layer model"
               for p in sorted(unused, key=str)]
  if problems:
    raise ValueError("unstack_layers: the model's variables do not match its config:\n  " + "\n  ".join(problems))


def _slice_sharding(x):
  """The sharding of x[r:r+1]: x's own with the (size-1) leading axis unsplit; None (XLA's choice) if unknown."""
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(None, *spec[1:]), memory_kind=sharding.memory_kind)
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  return None
