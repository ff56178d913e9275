"""Helper for tests/test_train_sharded.py, run in its own process: 8 fake CPU devices must be set before jax starts.

  python tests/train_sharded_check.py   ->  one JSON line on stdout

Builds the training run of a tiny model (a CSA and an HCA layer, the first hash-routed) with `loop.Trainer` on one
device and on 8-device meshes, takes two train steps on the same batches from the same initial state (born sharded
from the same seed) and reports the largest relative differences of the metrics, parameters, routing biases and
optimizer state against the single-device run, plus the shardings the Trainer gave them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv4_jax import sharding  # noqa: E402
from dsv4_jax.train import loop  # noqa: E402
from dsv4_jax.train.config import default_config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

MESHES = {"2x2x2x1": dict(data=2, fsdp=2, expert=2, tensor=1), "1x2x2x2": dict(data=1, fsdp=2, expert=2, tensor=2)}
STEPS = 2
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def run_config(corpus: str):
  c = default_config()
  c.model = "tiny"
  c.model_overrides.num_hidden_layers = 2
  c.model_overrides.compress_ratios = (4, 128)
  c.model_overrides.num_nextn_predict_layers = 0
  c.data.source = corpus
  c.data.vocab_size = 320
  c.data.seq_len = 64
  c.data.global_batch = 8
  c.data.eval_fraction = 0.0
  c.steps = 10
  c.optimizer.warmup_steps = 0  # a full-size first update
  # Newton-Schulz in float32: in bfloat16 a different summation order (sharded matmuls) can flip a rounding,
  # and ten iterations amplify it past the tolerance.
  c.optimizer.ns_dtype = "float32"
  # Adam's step is ~±lr whatever the gradient's size once |g| >> eps, so with eps = 1e-20 a gradient that is zero
  # in exact arithmetic but float32 rounding noise (layer 0's mHC comb rows: its streams are identical copies and
  # a doubly-stochastic comb cannot change them) moves by ±lr with a random sign, different on every mesh. With
  # eps well above that noise (~1e-9) the step is linear in such gradients and the comparison is well posed.
  c.optimizer.adam_eps = 1e-3
  c.async_checkpoint = False
  return c


def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)) if b.size else 0.0


def max_rel_diff(tree, ref) -> float:
  la, lb = jax.tree.leaves(tree), jax.tree.leaves(ref)
  assert len(la) == len(lb)
  return max((rel_diff(a, b) for a, b in zip(la, lb) if np.issubdtype(np.asarray(b).dtype, np.floating)),
             default=0.0)


def worst_leaves(tree, ref, n=3):
  """The n leaves of `tree` furthest from `ref`: [path, relative difference, max |ref|]."""
  named = jax.tree_util.tree_leaves_with_path(ref)
  out = [(jax.tree_util.keystr(p), rel_diff(a, b), float(np.max(np.abs(b))))
         for (p, b), a in zip(named, jax.tree.leaves(tree))]
  return sorted(out, key=lambda t: -t[1])[:n]


def spec_of(state, *path) -> str:
  node = state
  for k in path:
    node = node[k]
  return str(node[...].sharding.spec)


def train(cfg, workdir, devices=None):
  """(host states: initial and after each step, metrics of each step, the Trainer) of STEPS steps."""
  if devices is not None:
    original = loop.sharding.make_mesh
    loop.sharding.make_mesh = functools.partial(original, devices=devices)
  try:
    trainer = loop.Trainer(cfg, workdir)
  finally:
    if devices is not None:
      loop.sharding.make_mesh = original
  states, metrics = [jax.device_get(trainer.state)], []
  for _ in range(STEPS):
    batch, routing = trainer.next_batch()
    assert routing is None
    fn = trainer._step_fn("sparse", False)
    trainer.state, m = fn(trainer.state, batch, trainer._hparams())
    trainer.step += 1
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    states.append(jax.device_get(trainer.state))
  trainer.ckpt.close()
  return states, metrics, trainer


def main():
  tmp = tempfile.mkdtemp(prefix="train_sharded_")
  for i in range(24):
    stride = 1 + i % 3
    text = " ".join(WORDS[(i + stride * j) % len(WORDS)] for j in range(160))
    with open(os.path.join(tmp, f"doc{i}.txt"), "w") as f:
      f.write(text)
  corpus = os.path.join(tmp, "*.txt")
  report = {"devices": len(jax.devices()), "meshes": {}}
  cfg = run_config(corpus)
  ref_states, ref_metrics, ref = train(cfg, os.path.join(tmp, "one"), devices=jax.devices()[:1])
  report["reference_mesh"] = dict(ref.mesh.shape)
  report["reference_loss"] = [m["loss"] for m in ref_metrics]
  for name, mesh in MESHES.items():
    c = run_config(corpus)
    c.mesh.update(mesh)
    states, metrics, trainer = train(c, os.path.join(tmp, name))
    state = trainer.state
    params = state.params
    w1 = ("stacks", 0, "units", "blocks", 0, "ffn", "experts", "w1")
    leaves = jax.tree.leaves(params)
    momentum = jax.tree.leaves(state.opt_state)
    report["meshes"][name] = {
        "mesh": dict(trainer.mesh.shape),
        "loss": [m["loss"] for m in metrics],
        "metrics_rel_diff": max(rel_diff(m[k], r[k]) for m, r in zip(metrics, ref_metrics)
                                for k in ("loss", "ce", "balance", "indexer_kl", "grad_norm")),
        "finite": [m["finite"] for m in metrics],
        # [initial, after step 1, after step 2]
        "params_rel_diff": [max_rel_diff(s.params, r.params) for s, r in zip(states, ref_states)],
        "buffers_rel_diff": [max_rel_diff(s.buffers, r.buffers) for s, r in zip(states, ref_states)],
        "opt_state_rel_diff": [max_rel_diff(s.opt_state, r.opt_state) for s, r in zip(states, ref_states)],
        "steps": [int(s.step) for s in states],
        "worst_params": worst_leaves(states[-1].params, ref_states[-1].params),
        "params_update_rel": max_rel_diff(states[-1].params, states[0].params),
        "buffers_update_abs": max(float(np.max(np.abs(a - b))) for a, b in
                                  zip(jax.tree.leaves(states[-1].buffers), jax.tree.leaves(states[0].buffers))
                                  if np.issubdtype(a.dtype, np.floating)),
        "opt_specs_like_expert_w1": sorted({str(x.sharding.spec) for x in momentum
                                            if x.shape == params[w1[0]][w1[1]][w1[2]][w1[3]][w1[4]][w1[5]][w1[6]][
                                                w1[7]][...].shape}),
        "param_leaves": len(leaves),
        "sharded_param_leaves": sum(1 for x in leaves if not x.sharding.is_fully_replicated),
        "sharded_opt_leaves": sum(1 for x in momentum if not x.sharding.is_fully_replicated),
        "specs": {
            "expert_w1": spec_of(params, *w1),
            "wq_b": spec_of(params, "stacks", 0, "units", "blocks", 0, "attn", "wq_b"),
            "embed": spec_of(params, "embed"),
            "head": spec_of(params, "head"),
        },
        "batch_spec": str(trainer.batch_sharding.spec),
        "devices_used": len(state.params["embed"][...].sharding.device_set),
    }
  print(json.dumps(report))


if __name__ == "__main__":
  sys.exit(main())
