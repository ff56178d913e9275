"""The Trainer's jitted train step on 8 fake CPU devices (meshes data x fsdp x expert x tensor = 2x2x2x1 and
1x2x2x2) against the same step on one device: same loss, gradients (optimizer moments), routing biases and updated
parameters, with parameters and optimizer state really sharded. Runs tests/train_sharded_check.py in a subprocess
(the device count must be set before jax starts)."""

from __future__ import annotations

import pathlib

import pytest

from multidevice import run_report

SCRIPT = pathlib.Path(__file__).with_name("train_sharded_check.py")
MESHES = ["2x2x2x1", "1x2x2x2"]


@pytest.fixture(scope="module")
def report():
  return run_report(SCRIPT, timeout=900)


def test_reference_is_one_device(report):
  assert report["devices"] == 8
  assert report["reference_mesh"] == dict(data=1, fsdp=1, expert=1, tensor=1)


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_equals_single_device(report, mesh):
  r = report["meshes"][mesh]
  assert r["mesh"] == dict(zip(("data", "fsdp", "expert", "tensor"), map(int, mesh.split("x"))))
  assert r["steps"] == [0, 1, 2] and r["finite"] == [1.0, 1.0]
  # Loss, CE, balance, indexer KL and gradient norm of both steps.
  assert r["metrics_rel_diff"] < 1e-5, r["loss"]
  # Gradients (in the Muon momenta and Adam moments) and the routing biases (updated from integer loads).
  assert r["opt_state_rel_diff"][0] == 0.0 and max(r["opt_state_rel_diff"]) < 3e-5
  assert r["buffers_rel_diff"] == [0.0, 0.0, 0.0] and r["buffers_update_abs"] > 0
  # Parameters: born identical; after the updates equal to 1e-4 of each tensor's scale. Newton-Schulz pushes a
  # gradient's small singular values towards 1, which amplifies float32 reassociation noise (~1e-6) there.
  assert r["params_rel_diff"][0] == 0.0
  assert max(r["params_rel_diff"]) < 1e-4, r["worst_params"]
  assert r["params_update_rel"] > 0.05  # the steps moved the parameters far more than the tolerance


@pytest.mark.parametrize("mesh", MESHES)
def test_params_and_optimizer_state_are_sharded(report, mesh):
  r = report["meshes"][mesh]
  assert r["devices_used"] == 8
  assert r["sharded_param_leaves"] > 25 and r["param_leaves"] == 66
  assert r["specs"]["expert_w1"] == "P(None, 'expert', 'fsdp', 'tensor')"
  assert r["specs"]["embed"] == "P('tensor', 'fsdp')" and r["specs"]["head"] == "P('fsdp', 'tensor')"
  assert r["specs"]["wq_b"] == "P(None, None, 'tensor', None)"
  assert r["batch_spec"] == "P(('data', 'fsdp', 'expert'), None)"
  # Optimizer state mirrors its parameter's sharding (Muon momenta and both Adam moments).
  assert r["opt_specs_like_expert_w1"] == [r["specs"]["expert_w1"]]
  assert r["sharded_opt_leaves"] >= r["sharded_param_leaves"]


def test_tensor_axis_shards_more(report):
  one, two = report["meshes"]["2x2x2x1"], report["meshes"]["1x2x2x2"]
  assert two["sharded_param_leaves"] > one["sharded_param_leaves"]
