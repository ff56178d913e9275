"""Tests for dsv4_jax.sharding: the logical-axis rules, and a sharded forward on 8 fake CPU devices equal to the
single-device forward (run in a subprocess: the device count must be set before jax starts)."""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from dsv4_jax import sharding
from dsv4_jax.config import ModelConfig
from dsv4_jax.model.transformer import DeepSeekV4

MESH = AbstractMesh((1, 2, 2, 2), sharding.MESH_AXES)


def test_partition_spec_rules():
  assert sharding.partition_spec(("experts", "embed", "mlp"), (8, 64, 32), MESH) == P("expert", "fsdp", "tensor")
  # Stacked (scanned) parameters: extra leading axes stay replicated.
  assert sharding.partition_spec(("experts", "embed", "mlp"), (3, 8, 64, 32), MESH) == P(None, "expert", "fsdp",
                                                                                         "tensor")
  # A size the mesh axis does not divide stays replicated.
  assert sharding.partition_spec(("experts", "embed", "mlp"), (3, 63, 32), MESH) == P(None, None, "tensor")
  # A mesh axis is used once per array.
  assert sharding.partition_spec(("o_groups", "o_group_in", "o_lora"), (2, 4, 4), MESH) == P("tensor", None, None)
  assert sharding.partition_spec(("heads", "vocab"), (4, 8), MESH) == P("tensor", None)
  assert sharding.partition_spec((None, "norm"), (3, 8), MESH) == P(None, None)
  with pytest.raises(KeyError, match="no sharding rule"):
    sharding.partition_spec(("bogus",), (8,), MESH)


def test_every_parameter_has_a_rule():
  abstract = nnx.eval_shape(lambda: DeepSeekV4(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0)))
  shardings = sharding.state_shardings(nnx.state(abstract), MESH)
  variables = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert len(variables) > 100
  specs = [v.get_value().spec for v in variables]
  assert any(any(a is not None for a in spec) for spec in specs)


def test_make_mesh_sizes():
  one = jax.devices()[:1]
  mesh = sharding.make_mesh(fsdp=-1, devices=one)
  assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == dict(data=1, fsdp=1, expert=1, tensor=1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh(data=-1, fsdp=-1, devices=one)
  with pytest.raises(ValueError, match="needs 2 devices"):
    sharding.make_mesh(data=2, fsdp=1, devices=one)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.make_mesh(data=2, fsdp=-1, devices=one)


@pytest.mark.parametrize("mesh", ["1x2x2x2", "2x1x2x2"])
def test_sharded_forward_equals_single_device(sharded_report, mesh):
  """tests/sharded_forward_check.py (started by conftest): params born sharded, batch sharded, 8 CPU devices."""
  assert sharded_report["devices"] == 8
  r = sharded_report["meshes"][mesh]
  assert r["same_weights"]  # born sharded, same values on any mesh
  assert r["sharded_leaves"] > 20
  assert r["specs"]["expert_w1"] == str(P(None, "expert", "fsdp", "tensor"))
  assert r["specs"]["embed"] == str(P("tensor", "fsdp"))
  assert r["logits_rel_diff"] < 1e-5 and r["hidden_rel_diff"] < 1e-5
