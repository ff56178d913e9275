"""Shared test setup: float32 "highest" matmuls, fast random models, and numpy references used by several files.

Models are built shape-first (`nnx.eval_shape`) and filled with numpy random values: no XLA compile of the
initializers (about 10 s per model on 2 CPU cores), and non-trivial values where the real init has ones/zeros
(norm weights, routing bias, mHC scales), so the tests see every parameter act.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import types

# CPU tests. The dev extra installs libtpu (for ahead-of-time TPU compiles), which otherwise probes for a TPU
# at start-up and logs errors on machines without one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

jax.config.update("jax_default_matmul_precision", "highest")

from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model.transformer import DeepSeekV4  # noqa: E402

# Leading axes of a weight that index independent matrices (fan-in is the next axis).
_MATRIX_BATCH_AXES = ("experts", "o_groups")


def _random_value(path, var, cfg, rng):
  shape, dtype = tuple(var.shape), np.dtype(var.dtype)
  name = str(path[-1].key)
  axes = tuple(var.get_metadata().get("logical_axes", ()))
  extra = len(shape) - len(axes)
  if np.issubdtype(dtype, np.integer):  # tid2eid: distinct experts per token
    order = np.argsort(rng.random(shape[:-1] + (cfg.n_routed_experts,)), axis=-1)
    return order[..., :shape[-1]].astype(dtype)
  normal = rng.standard_normal(shape)
  if axes == ("norm",):
    value = 1.0 + 0.2 * normal
  elif name == "scale":  # mHC alphas
    value = 1.0 + 0.2 * normal
  elif name in ("base", "attn_sink"):
    value = normal
  elif name == "bias":  # router selection bias
    value = 0.3 * normal
  elif name == "ape":
    value = 0.5 * normal
  elif name == "fn":  # mHC projections of the flattened streams
    value = 0.5 * shape[-1] ** -0.5 * normal
  elif name == "embed" and len(path) == 1:
    value = normal
  else:
    fan_in = shape[extra + (1 if axes and axes[0] in _MATRIX_BATCH_AXES else 0)]
    value = fan_in ** -0.5 * normal
  return value.astype(dtype)


def random_model(cfg: ModelConfig, seed: int = 0) -> DeepSeekV4:
  """DeepSeekV4(cfg) with numpy-random parameters (no jitted init)."""
  abstract = nnx.eval_shape(lambda: DeepSeekV4(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  state = jax.tree_util.tree_map_with_path(
      lambda p, v: v.replace(jnp.asarray(_random_value(p, v, cfg, rng))), state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


@functools.cache
def cached_model(cfg: ModelConfig, seed: int = 0) -> DeepSeekV4:
  """One random model per (config, seed) for the whole session (tests must not mutate it)."""
  return random_model(cfg, seed)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
  return ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def model_factory():
  """`model_factory(cfg, seed=0)`: a session-cached random DeepSeekV4."""
  return cached_model


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
  return cached_model(tiny_cfg)


# ---------------------------------------------------------------------------------------------------------------
# Independent numpy references (float64), written from the spec, shared by several test files.
def rope_freqs_np(rope_dim, theta, factor=1.0, original_len=0, beta_fast=32.0, beta_slow=1.0):
  """Spec §4 "RoPE variant": theta^(-2i/R), YaRN-interpolated when original_len > 0."""
  freqs = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
  if original_len <= 0:
    return freqs

  def corr(rot):
    return rope_dim * math.log(original_len / (rot * 2 * math.pi)) / (2 * math.log(theta))

  low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), rope_dim - 1)
  if low == high:
    high += 0.001
  smooth = 1 - np.clip((np.arange(rope_dim // 2) - low) / (high - low), 0, 1)
  return freqs / factor * (1 - smooth) + freqs * smooth


def layer_freqs_np(cfg, compressed: bool):
  if compressed:
    return rope_freqs_np(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_factor,
                         cfg.original_max_position_embeddings, cfg.beta_fast, cfg.beta_slow)
  return rope_freqs_np(cfg.qk_rope_head_dim, cfg.rope_theta)


def rotate_np(x, positions, freqs, inverse=False):
  """Interleaved-pair complex rotation of the last 2·len(freqs) dims of x[..., P, (heads...), D].

  positions broadcast against x's leading axes up to (excluding) the axes after them; given as an array of
  the shape x.shape[:positions.ndim].
  """
  x = np.asarray(x, np.float64)
  positions = np.asarray(positions, np.float64)
  r = 2 * len(freqs)
  angles = positions[..., None] * freqs  # [..., R/2]
  angles = angles.reshape(angles.shape[:-1] + (1,) * (x.ndim - 1 - positions.ndim) + angles.shape[-1:])
  rot = np.exp((-1j if inverse else 1j) * angles)
  pairs = x[..., -r:].reshape(x.shape[:-1] + (r // 2, 2))
  z = (pairs[..., 0] + 1j * pairs[..., 1]) * rot
  out = x.copy()
  out[..., -r:] = np.stack([z.real, z.imag], axis=-1).reshape(x.shape[:-1] + (r,))
  return out


def rms_norm_np(x, weight=None, eps=1e-6):
  x = np.asarray(x, np.float64)
  y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  return y if weight is None else y * np.asarray(weight, np.float64)


def softmax_np(x, axis=-1):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(x - m)
  return e / np.sum(e, axis=axis, keepdims=True)


@pytest.fixture(scope="session")
def np_ref():
  """The numpy references above, as one namespace."""
  return types.SimpleNamespace(rope_freqs=rope_freqs_np, layer_freqs=layer_freqs_np, rotate=rotate_np,
                               rms_norm=rms_norm_np, softmax=softmax_np)


# ---------------------------------------------------------------------------------------------------------------
# The 8-device sharded forward (tests/test_sharding.py) runs in its own process, started as soon as the tests are
# collected so that it compiles on the second core while the other tests run.
_SHARDED = pytest.StashKey[tuple]()


def _start_sharded_check():
  script = pathlib.Path(__file__).with_name("sharded_forward_check.py")
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  proc = subprocess.Popen([sys.executable, str(script)], stdout=out, stderr=err, text=True,
                          env={**os.environ, "XLA_FLAGS": ""})
  return proc, out, err


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
  if hasattr(config, "workerinput"):
    return  # a pytest-xdist worker: start on demand, only in the worker that runs the test
  if any("sharded_report" in getattr(item, "fixturenames", ()) for item in items):
    config.stash[_SHARDED] = _start_sharded_check()


def pytest_unconfigure(config):
  started = config.stash.get(_SHARDED, None)
  if started is not None and started[0].poll() is None:
    started[0].kill()


@pytest.fixture(scope="session")
def sharded_report(request):
  """The JSON report of tests/sharded_forward_check.py."""
  started = request.config.stash.get(_SHARDED, None) or _start_sharded_check()
  proc, out, err = started
  proc.wait(timeout=600)
  out.seek(0)
  err.seek(0)
  assert proc.returncode == 0, err.read()[-3000:]
  return json.loads(out.read().strip().splitlines()[-1])


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """The whole suite runs in one process: drop each module's compiled executables and traces when it ends, so
  memory does not grow across ~1,100 tests (XLA and libtpu compiles included)."""
  yield
  jax.clear_caches()
  import gc
  gc.collect()
