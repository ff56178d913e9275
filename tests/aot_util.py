"""Shared pieces of the ahead-of-time TPU compile tests (tests/test_*_aot.py): abstract arguments on a device of a
TPU topology, the compile itself (libtpu's Mosaic and XLA:TPU compilers, from this CPU host) and its printed
memory figures. Import it before anything starts a jax backend: it lets a second process load libtpu. Skips the
importing module when libtpu is not installed.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu otherwise locks out a second process using it

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from pallas_kernels.sparse_attention.tpu import compile_for_tpu  # noqa: E402

pytest.importorskip("libtpu", reason="AOT TPU compiles need libtpu (the dev extra's jax[tpu])")
from jax.experimental import topologies  # noqa: E402

HBM_BYTES = {"v5p": 95e9, "v6e": 32e9}  # per chip
ALL = os.environ.get("DSV4_AOT_ALL") == "1"
only_all = pytest.mark.skipif(not ALL, reason="DSV4_AOT_ALL=1")  # the cases beyond CI's


def hbm_bytes(topology: str) -> float:
  """HBM per chip of a topology such as "v5p:2x2x1"."""
  return HBM_BYTES[topology.split(":")[0]]


def abstract_arg(topology: str):
  """arg(shape, dtype): a jax.ShapeDtypeStruct placed on the first device of the TPU topology."""
  device = topologies.get_topology_desc(topology, "tpu").devices[0]
  return lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))


def compile_tpu(label: str, fn, args, *, unit: str = "GiB", digits: int = 2):
  """`compiled.memory_analysis()` of jax.jit(fn) lowered for args (placed on a TPU topology's device) and compiled;
  prints its figures (in MiB or GiB) and the compile time under `label`."""
  with compile_for_tpu():  # a fresh jit inside: traced for Mosaic although the default backend is the CPU
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
  seconds, m = time.perf_counter() - start, compiled.memory_analysis()
  size = lambda n: f"{n / (2**20 if unit == 'MiB' else 2**30):.{digits}f}"
  print(f"\n{label}: argument {size(m.argument_size_in_bytes)} {unit}, output {size(m.output_size_in_bytes)} {unit}, "
        f"temp {size(m.temp_size_in_bytes)} {unit}, alias {size(m.alias_size_in_bytes)} {unit}; compiled in "
        f"{seconds:.1f} s")
  return m
