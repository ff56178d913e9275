"""End-to-end tests of the training loop (dsv4_jax.train.loop) and `dsv4 train` / `dsv4 generate`: exact resume,
refused incompatible resume, spike rollback with anticipatory routing, NaN injection, the run's artefacts (metrics,
TensorBoard, checkpoints, hf/ export) and the loss actually falling.

Every run is a 2-layer tiny model (a CSA and an HCA layer, the first hash-routed, plus an SWA MTP layer) on a small,
fully predictable corpus written to a temp dir, 64-token rows, batches of 4. The Trainers of this module re-jit the
same functions, so a persistent compilation cache (a temp dir, this module only) compiles each one once.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import dsv4_jax
from dsv4_jax import cli
from dsv4_jax.train import checkpoint as ckpt_lib
from dsv4_jax.train import loop

ROOT = pathlib.Path(__file__).parent.parent
TRAIN_TINY = ROOT / "configs" / "train_tiny.py"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()

# The run config as a user would write it: configs/train_tiny.py, shrunk. decay_start=1.0 keeps the LR schedule
# of the first N steps independent of `steps` (a resume may extend a run).
RUN_CONFIG = '''
import importlib.util

def get_config():
  spec = importlib.util.spec_from_file_location("train_tiny", {train_tiny!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model_overrides.num_hidden_layers = 2
  c.model_overrides.compress_ratios = (4, 128, 0)
  c.data.source = {source!r}
  c.data.vocab_size = 320
  c.data.seq_len = 64
  c.data.global_batch = 4
  c.data.eval_fraction = 0.2
  c.steps = 40
  c.optimizer.warmup_steps = 5
  c.optimizer.decay_start = 1.0
  c.log_every = 5
  c.eval_every = 20
  c.eval_batches = 1
  c.checkpoint_every = 10
  c.progress = False
  return c
'''


def _document(i: int) -> str:
  """A cycle through WORDS with a per-document stride: each word fixes the next one within a document."""
  stride = 1 + i % 3
  return " ".join(WORDS[(i + stride * j) % len(WORDS)] for j in range(160)) + "."


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module's Trainers (restored afterwards)."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.reset_cache()
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  cc.reset_cache()


@pytest.fixture(scope="module")
def run_config_file(tmp_path_factory) -> pathlib.Path:
  """The corpus (.txt documents and a .jsonl file) and a config file training on it."""
  d = tmp_path_factory.mktemp("corpus")
  for i in range(30):
    (d / f"doc{i:02d}.txt").write_text(_document(i))
  with open(d / "more.jsonl", "w") as f:
    for i in range(30, 40):
      f.write(json.dumps({"text": _document(i)}) + "\n")
  path = d / "run_config.py"
  path.write_text(RUN_CONFIG.format(train_tiny=str(TRAIN_TINY), source=f"{d}/*.txt,{d}/*.jsonl"))
  return path


def make_config(config_file, **fields) -> ml_collections.ConfigDict:
  """The run config with fields set by dotted name (`**{"data.seq_len": 128}`); new keys allowed."""
  cfg = cli.parse_train_flags(["--config", str(config_file), "--workdir", "unused"])[0]
  cfg.unlock()
  for name, value in fields.items():
    *parents, leaf = name.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def train(cfg, workdir) -> loop.Trainer:
  """Runs `cfg` in `workdir` to cfg.steps; returns the Trainer (its state is the final one)."""
  trainer = loop.Trainer(cfg, str(workdir))
  try:
    trainer.run()
  finally:
    trainer.ckpt.close()
  return trainer


def read_metrics(workdir):
  """(step rows, event rows) of metrics.jsonl, in file order."""
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "event" not in r], [r for r in rows if "event" in r]


def restore_all(trainer, workdir):
  """{step: (state, meta)} of every checkpoint in workdir, restored onto the trainer's shardings."""
  abstract = loop.abstract_of(trainer.state)
  out = {}
  with ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False) as ckpt:
    for step in ckpt.all_steps():
      state, _, meta = ckpt.restore(step, abstract_state=abstract)
      out[step] = (state, meta)
  return out


def all_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def run_a(run_config_file, tmp_path_factory):
  """The reference run: 0 -> 40 uninterrupted."""
  wd = tmp_path_factory.mktemp("run_a")
  trainer = train(make_config(run_config_file), wd)
  rows, events = read_metrics(wd)
  return dict(wd=wd, trainer=trainer, rows=rows, events=events)


# ----- resume ----------------------------------------------------------------------------------------------------
def test_resume_is_exact(run_a, run_config_file, tmp_path, capsys):
  """0 -> 20 (steps=20), then `dsv4 train --config.steps=40` in the same workdir: the same losses for steps
  21-40 as the uninterrupted run, bit for bit, and the same final parameters, routing biases and optimizer state."""
  wd = tmp_path / "run_b"
  loop.train(make_config(run_config_file, steps=20), wd)
  rows, _ = read_metrics(wd)
  assert [r["step"] for r in rows] == list(range(1, 21))
  assert cli.main(["train", "--config", str(run_config_file), "--workdir", str(wd), "--config.steps=40"]) == 0
  assert '"step": 40' in capsys.readouterr().out
  rows, events = read_metrics(wd)
  assert events == [] and [r["step"] for r in rows] == list(range(1, 21)) + list(range(21, 41))
  ref = {r["step"]: r for r in run_a["rows"]}
  for r in rows:  # the first 20 steps too: the runs are deterministic
    for k in ("loss", "ce", "mtp_ce", "grad_norm", "indexer_kl", "lr"):
      assert r[k] == ref[r["step"]][k], (r["step"], k, r[k], ref[r["step"]][k])
  assert rows[-1]["eval_loss"] == ref[40]["eval_loss"]

  resumed = restore_all(run_a["trainer"], wd)
  assert sorted(resumed) == [20, 30, 40]
  state_b, state_a = resumed[40][0], run_a["trainer"].state
  assert int(state_b.step) == int(state_a.step) == 40
  for part in ("params", "buffers", "opt_state"):
    assert_trees_equal(getattr(state_b, part), getattr(state_a, part))
  np.testing.assert_array_equal(np.asarray(state_b.rng), np.asarray(state_a.rng))


@pytest.mark.parametrize("fields, named", [
    ({"model_overrides.hidden_size": 128}, ["model.hidden_size"]),
    ({"data.seq_len": 128}, ["train.data.seq_len"]),
    ({"data.seq_len": 32, "seed": 1, "model_overrides.moe_intermediate_size": 64},
     ["model.moe_intermediate_size", "train.data.seq_len", "train.seed"]),
])
def test_incompatible_resume_is_refused_before_any_work(run_a, run_config_file, monkeypatch, fields, named):
  def no_work(*_):
    raise AssertionError("the Trainer built its state before checking the checkpoint")

  monkeypatch.setattr(loop.Trainer, "_init_state", no_work)
  monkeypatch.setattr(loop.data, "train_iterator", no_work)
  wd = run_a["wd"]
  before = (wd / "metrics.jsonl").read_bytes(), sorted(p.name for p in (wd / "checkpoints").iterdir())
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint) as e:
    loop.train(make_config(run_config_file, **fields), wd)
  assert sorted(d.split(":")[0] for d in e.value.differences) == named
  for name in named:
    assert name in str(e.value)
  assert ((wd / "metrics.jsonl").read_bytes(), sorted(p.name for p in (wd / "checkpoints").iterdir())) == before


def test_incompatible_resume_via_cli_exits_with_message(run_a, run_config_file):
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--config", str(run_config_file), "--workdir", str(run_a["wd"]), "--config.data.seq_len=32"])
  msg = str(e.value)
  assert msg.startswith("dsv4 train: error: checkpoint does not match")
  assert "train.data.seq_len: saved 64, now 32" in msg


def test_resume_allows_run_length_and_logging_changes(run_a, run_config_file):
  with ckpt_lib.Checkpointer(run_a["wd"] / "checkpoints") as ckpt:
    saved = ckpt.read_meta()
  changed = make_config(run_config_file, steps=400, log_every=1, eval_every=7, checkpoint_every=3,
                        **{"optimizer.peak_lr": 1e-3, "stability.k_sigma": 3.0, "progress": True})
  meta = {"model": loop.model_config_for(changed, run_a["trainer"].tok).to_dict(),
          "train": loop.train_config.flat(changed)}
  ckpt_lib.check_compatible(saved, meta, critical_train_keys=loop.train_config.CRITICAL_TRAIN_KEYS)


# ----- the run's artefacts ---------------------------------------------------------------------------------------
def test_metrics_tensorboard_and_checkpoints(run_a):
  rows, events, wd = run_a["rows"], run_a["events"], run_a["wd"]
  assert events == []
  assert [r["step"] for r in rows] == list(range(1, 41))
  for r in rows:
    assert math.isfinite(r["loss"]) and r["finite"] == 1.0 and r["stage"] == "sparse"
    assert 4 * 60 <= r["tokens"] <= 4 * 63  # unpadded rows: all next-token targets but document boundaries
    assert ("tokens_per_s" in r) == (r["step"] % 5 == 0)
    assert ("eval_loss" in r) == (r["step"] in (20, 40))
  assert rows[4]["lr"] == pytest.approx(3e-3 * 4 / 5) and rows[-1]["lr"] == pytest.approx(3e-3)
  assert any(p.name.startswith("events.out.tfevents") for p in (wd / "tb").iterdir())
  assert (wd / "tokenizer.json").is_file()
  restored = restore_all(run_a["trainer"], wd)
  assert sorted(restored) == [20, 30, 40]  # keep_checkpoints = 3
  assert_trees_equal(restored[40][0].params, run_a["trainer"].state.params)


def test_loss_falls(run_a):
  """40 steps on the predictable corpus: the loss ends well below where it started, on train and held-out data."""
  losses = [r["loss"] for r in run_a["rows"]]
  ce = [r["ce"] for r in run_a["rows"]]
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  assert np.mean(ce[-5:]) < 0.4 * np.mean(ce[:5]), ce
  evals = [r["eval_loss"] for r in run_a["rows"] if "eval_loss" in r]
  assert evals[-1] < evals[0] < math.log(320)


def test_hf_export_loads_and_matches_the_trainer(run_a):
  model, cfg = dsv4_jax.load_pretrained(run_a["wd"] / "hf", dtype=None, progress=False)
  trainer_model = run_a["trainer"].model()
  assert cfg == run_a["trainer"].mcfg
  assert_trees_equal(nnx.state(model, nnx.Param), nnx.state(trainer_model, nnx.Param))
  tokens = np.asarray(run_a["trainer"].tok.encode(" ".join(WORDS * 4)), np.int32)[None, :64]

  @nnx.jit
  def logits(m, t):
    return m(t, with_mtp=False).logits

  np.testing.assert_allclose(np.asarray(logits(model, tokens)), np.asarray(logits(trainer_model, tokens)),
                             rtol=1e-6, atol=1e-6)


def test_generate_cli_is_deterministic(run_a, capsys):
  argv = ["generate", "--checkpoint", str(run_a["wd"] / "hf"), "--prompt", "alpha beta", "--max-new-tokens", "5"]
  outs = []
  for _ in range(2):
    assert cli.main(argv) == 0
    outs.append(capsys.readouterr().out)
  assert outs[0] == outs[1]
  assert outs[0].startswith("alpha beta") and len(outs[0].strip()) > len("alpha beta")


# ----- spikes and NaNs ---------------------------------------------------------------------------------------------
# steps=20 in these runs as in the resume test's first leg: the LR schedule (hence the compiled step) depends on it.
STABILITY = {"stability.min_history": 5, "stability.snapshot_every": 5, "stability.anticipatory_delta": 2,
             "stability.anticipatory_steps": 4, "checkpoint_every": 5, "keep_checkpoints": 100, "eval_every": 0}


def test_spike_rollback_and_anticipatory_routing(run_config_file, tmp_path):
  """An LR blip (x1000) at step 14 blows the parameters up; the next loss is a spike: roll back to the snapshot
  at 10, route 2 steps ahead for 4 steps, then train normally to the end. No checkpoint keeps the blown state."""
  wd = tmp_path / "spike"
  cfg = make_config(run_config_file, steps=20, **STABILITY, **{"debug.lr_blip_step": 14})
  trainer = train(cfg, wd)
  rows, events = read_metrics(wd)
  assert [(e["event"], e["step"]) for e in events] == [
      ("spike", 15), ("rollback", 15), ("anticipatory_on", 10), ("anticipatory_off", 14)]
  spike, rollback = events[0], events[1]
  assert rollback["to_step"] == 10 and rollback["source"] == "memory"
  assert rollback["deleted_checkpoints"] == [15]  # saved right after the blip, before its loss showed
  pre, post = rows[:15], rows[15:]
  assert [r["step"] for r in pre] == list(range(1, 16)) and [r["step"] for r in post] == list(range(11, 21))
  assert not math.isfinite(spike["loss"]) or spike["loss"] > 2 * max(r["loss"] for r in pre[5:])
  for r in post:
    assert math.isfinite(r["loss"]) and r["loss"] < min(spike["loss"], pre[9]["loss"] * 1.5)
    assert r["anticipatory"] == (r["step"] < 14)
  assert int(trainer.state.step) == 20 and all_finite(trainer.state.params)

  restored = restore_all(trainer, wd)
  assert sorted(restored) == [5, 10, 15, 20]
  for step, (state, meta) in restored.items():
    assert all_finite(state) and int(state.step) == step
    # A checkpoint past the rollback target holds the recovered trajectory, not the blown-up one.
    assert meta["stability"]["rollbacks"] == (step > 10), step


@pytest.mark.parametrize("stability", [True, False])
def test_nan_update_never_reaches_params_or_checkpoints(run_config_file, tmp_path, stability):
  """A non-finite update at step 9 (lr_scale = NaN; loss and gradients are finite) is not applied: with stability
  on it counts as a spike (rollback to 5), with it off the step is skipped."""
  wd = tmp_path / "nan"
  cfg = make_config(run_config_file, steps=20, **STABILITY, **{"debug.nan_step": 9, "stability.enabled": stability})
  trainer = train(cfg, wd)
  rows, events = read_metrics(wd)
  if stability:
    assert [(e["event"], e["step"]) for e in events][:3] == [("spike", 9), ("rollback", 9), ("anticipatory_on", 5)]
    assert events[1]["to_step"] == 5
  else:
    assert [(e["event"], e["step"]) for e in events] == [("skipped_non_finite", 9)]
    assert [r["step"] for r in rows] == list(range(1, 21))
  assert all(math.isfinite(r["loss"]) and r["finite"] == 1.0 for r in rows)
  assert int(trainer.state.step) == 20 and all_finite(trainer.state)
  restored = restore_all(trainer, wd)
  assert sorted(restored) == [5, 10, 15, 20]
  assert all(all_finite(state) for state, _ in restored.values())


# ----- command line ------------------------------------------------------------------------------------------------
def test_train_flags_override_the_config_file(tmp_path):
  cfg, workdir = cli.parse_train_flags(["--config", str(TRAIN_TINY), "--workdir", str(tmp_path),
                                        "--config.steps=3", "--config.data.seq_len=64",
                                        "--config.optimizer.peak_lr=1e-4", "--config.stability.enabled=False"])
  assert workdir == str(tmp_path)
  assert (cfg.steps, cfg.data.seq_len, cfg.optimizer.peak_lr, cfg.stability.enabled) == (3, 64, 1e-4, False)
  assert cfg.data.global_batch == 8 and cfg.model == "tiny"  # the rest from the file


@pytest.mark.parametrize("argv, message", [
    (["--workdir", "w"], "--config is required"),
    (["--config", str(TRAIN_TINY)], "--workdir is required"),
    (["--config", str(TRAIN_TINY), "--workdir", "w", "--config.nope=1"],
     "--config.nope=1: the config has no field 'nope'"),
    (["--config", str(TRAIN_TINY), "--workdir", "w", "--config.data.seq_lenn=3"], "no field 'seq_lenn'"),
    (["--config", str(TRAIN_TINY), "--workdir", "w", "--config.steps=many"], "--config.steps=many"),
    (["--config", "no/such/config.py", "--workdir", "w"], "no/such/config.py"),
])
def test_train_flag_errors_exit_with_a_message(capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    cli.main(["train", *argv])
  assert str(e.value).startswith("dsv4 train: error:") and message in str(e.value)
