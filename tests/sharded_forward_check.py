"""Helper for tests/test_sharding.py, run in its own process: 8 fake CPU devices must be set before jax starts.

  python tests/sharded_forward_check.py   ->  one JSON line on stdout

Builds a tiny model born sharded (`sharding.create_sharded`) on each mesh, runs the jitted forward on a batch
sharded over the non-tensor axes, and compares it with the same weights on one device.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv4_jax import sharding  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model.transformer import DeepSeekV4  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

MESHES = {"1x2x2x2": (1, 2, 2, 2), "2x1x2x2": (2, 1, 2, 2)}
# A CSA and an HCA layer (the first hash-routed), no MTP (its init compile alone is ~5 s); S covers an HCA block.
CFG = ModelConfig.preset("tiny", num_hidden_layers=2, compress_ratios=(4, 128), num_nextn_predict_layers=0)
B, S = 4, 136


@nnx.jit
def forward(model, tokens, segment):
  out = model(tokens, segment_ids=segment)
  return out.logits, out.hidden


def host_state(model):
  return jax.tree.map(np.asarray, nnx.state(model))


def main():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (B, S)).astype(np.int32)
  segment = np.repeat(np.array([[0] * 70 + [1] * 66]), B, axis=0).astype(np.int32)
  report = {"devices": len(jax.devices()), "meshes": {}}
  reference, weights = None, None
  for name, shape in MESHES.items():
    mesh = sharding.make_mesh(*shape)
    model = sharding.create_sharded(DeepSeekV4, CFG, mesh, seed=0)
    state = nnx.state(model)
    leaves = jax.tree.leaves(state)
    sharded = sum(1 for x in leaves if not x.sharding.is_fully_replicated)
    specs = {
        "expert_w1": str(state["stacks"][0]["units"]["blocks"][0]["ffn"]["experts"]["w1"][...].sharding.spec),
        "wq_b": str(state["stacks"][0]["units"]["blocks"][0]["attn"]["wq_b"][...].sharding.spec),
        "embed": str(state["embed"][...].sharding.spec),
    }
    host = host_state(model)
    if weights is None:
      weights = host
      graphdef = nnx.graphdef(model)
      one = nnx.merge(graphdef, jax.device_put(host, jax.devices()[0]))
      reference = [np.asarray(x) for x in forward(one, jnp.asarray(tokens), jnp.asarray(segment))]
    same_weights = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(host)))
    batch = sharding.batch_sharding(mesh)
    out = forward(model, jax.device_put(tokens, batch), jax.device_put(segment, batch))
    diffs = [float(np.max(np.abs(np.asarray(o) - r)) / np.max(np.abs(r))) for o, r in zip(out, reference)]
    report["meshes"][name] = {
        "sharded_leaves": sharded, "leaves": len(leaves), "specs": specs, "same_weights": same_weights,
        "logits_rel_diff": diffs[0], "hidden_rel_diff": diffs[1], "out_sharding": str(out[0].sharding.spec),
    }
  print(json.dumps(report))


if __name__ == "__main__":
  main()
