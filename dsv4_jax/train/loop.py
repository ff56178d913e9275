"""The training loop behind `dsv4 train`: build or resume, step, watch for spikes, log, evaluate, checkpoint.

WORKDIR layout: tokenizer.json, checkpoints/<step>/ (orbax), metrics.jsonl (one object per step, plus event
rows), tb/ (TensorBoard), hf/ (the final model in the official format, with tokenizer.json).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv4_jax import accounting, sharding
from dsv4_jax.config import ModelConfig, load_model_config
from dsv4_jax.model.transformer import DeepSeekV4
from dsv4_jax.train import checkpoint as ckpt_lib
from dsv4_jax.train import config as train_config
from dsv4_jax.train import data, optimizer, stability
from dsv4_jax.train import step as step_lib

log = logging.getLogger(__name__)

# bf16 dense peak per device (FLOP/s), for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
              "TPU v6 lite": 918e12, "TPU v4": 275e12}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def model_config_for(cfg, tok) -> ModelConfig:
  """The ModelConfig of the run: cfg.model plus overrides, with the vocabulary of the data config."""
  overrides = dict(cfg.model_overrides.to_dict())
  overrides.setdefault("vocab_size", cfg.data.vocab_size)
  mcfg = load_model_config(cfg.model, **overrides)
  if tok.vocab_size > mcfg.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but model vocab_size is {mcfg.vocab_size}; "
                     f"raise data.vocab_size (or model_overrides.vocab_size)")
  return mcfg


def abstract_of(state):
  """ShapeDtypeStructs carrying each array's sharding: the restore target for a state like `state`."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def optimizer_state_shardings(abstract_opt_state, params, default):
  """Each optimizer-state leaf takes the sharding of the parameter it mirrors (same key-path suffix and
  shape: momenta, Adam moments); counters and anything else get `default`."""
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    by_path[jax.tree_util.keystr(tuple(path))] = leaf
    if path and getattr(path[-1], "name", None) == "value":  # Muon's momentum holds arrays, not Variables
      by_path[jax.tree_util.keystr(tuple(path[:-1]))] = leaf

  def one(path, leaf):
    for i in range(len(path)):
      match = by_path.get(jax.tree_util.keystr(tuple(path[i:])))
      if match is not None and match.shape == leaf.shape:
        return match.sharding
    return default

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def init_sharded_state(mcfg: ModelConfig, tx, mesh, seed: int = 0) -> step_lib.TrainState:
  """A fresh TrainState born sharded on `mesh`: parameters by their logical axes, optimizer state like the
  parameters it mirrors, the rest replicated (the Trainer's; also experiments/bench_train.py's)."""
  model = sharding.create_sharded(DeepSeekV4, mcfg, mesh, seed=seed)
  _, params, buffers = step_lib.split_model(model)
  replicated = NamedSharding(mesh, P())
  opt_sharding = optimizer_state_shardings(jax.eval_shape(tx.init, params), params, replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
  put = lambda x: jax.device_put(x, replicated)
  return step_lib.TrainState(step=put(jnp.zeros((), jnp.int32)), params=params, buffers=buffers,
                             opt_state=opt_state, rng=put(jax.random.key_data(jax.random.key(seed))))


class MetricsWriter:
  """metrics.jsonl (appended; one object per step and per event) and TensorBoard scalars."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._f = open(self.path, "a", buffering=1)
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # optional
        log.warning("tensorboardX is not installed: no TensorBoard logs")

  def write(self, row: dict[str, Any]) -> None:
    self._f.write(json.dumps(row) + "\n")
    if self._tb is not None and "step" in row and "event" not in row:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, row["step"])

  def event(self, step: int, name: str, **fields) -> None:
    row = {"event": name, "step": step, **fields}
    log.warning("stability: %s", json.dumps(row))
    self.write(row)

  def close(self) -> None:
    self._f.close()
    if self._tb is not None:
      self._tb.close()


traced_under = sharding.traced_under  # re-exported: the Trainer's steps and the benchmarks use it from here


class Trainer:
  """Everything a run holds; `run()` trains to cfg.steps (resuming from WORKDIR when a checkpoint exists)."""

  def __init__(self, cfg, workdir: str):
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.tok = data.build_tokenizer(cfg.data, self.workdir)
    self.mcfg = model_config_for(cfg, self.tok)
    self.mesh = sharding.make_mesh(**cfg.mesh.to_dict())
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                                      async_save=cfg.async_checkpoint)
    self.meta = {"model": self.mcfg.to_dict(), "train": train_config.flat(cfg)}
    latest = self.ckpt.latest_step()
    if latest is not None:  # refuse an incompatible resume before building anything
      try:
        ckpt_lib.check_compatible(self.ckpt.read_meta(latest), self.meta,
                                  critical_train_keys=list(train_config.CRITICAL_TRAIN_KEYS))
      except ckpt_lib.IncompatibleCheckpoint:
        self.ckpt.close()
        raise

    o = cfg.optimizer
    total = cfg.steps
    self.decay_start = int(o.decay_start * total)
    self.schedule = optimizer.lr_schedule(o.peak_lr, min(o.warmup_steps, self.decay_start), total,
                                          self.decay_start, o.peak_lr * o.end_lr_ratio)
    abstract = nnx.eval_shape(lambda: DeepSeekV4(self.mcfg, rngs=nnx.Rngs(cfg.seed)))
    self.graphdef, abstract_params, _ = step_lib.split_model(abstract)
    self.tx = optimizer.build_optimizer(
        abstract_params, learning_rate=self.schedule, weight_decay=o.weight_decay, muon_momentum=o.muon_momentum,
        muon_rms=o.muon_rms, adam_b1=o.adam_b1, adam_b2=o.adam_b2, adam_eps=o.adam_eps,
        ns_dtype=jnp.dtype(o.ns_dtype))
    self.state = self._init_state()
    self.state_sharding = jax.tree.map(lambda a: a.sharding, self.state)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = NamedSharding(self.mesh, P())

    self.it = data.train_iterator(cfg.data, self.tok)
    self.detector = stability.SpikeDetector(cfg.stability.k_sigma, cfg.stability.min_rel, cfg.stability.ema_decay,
                                            cfg.stability.min_history)
    self.ar = stability.AnticipatoryMode(cfg.stability.anticipatory_delta, cfg.stability.anticipatory_steps)
    self.snapshots = stability.Snapshots(cfg.stability.snapshot_every, cfg.stability.keep_snapshots)
    self.step = 0
    self.rollbacks = 0
    self.injected: set[str] = set()
    self.pending: collections.deque = collections.deque()  # (batch, data state before it, routing or None)
    if latest is not None:
      self._restore(latest)
    self._compiled: dict[Any, Any] = {}
    self.flops_per_token = accounting.train_flops_per_token(self.mcfg, cfg.data.seq_len, cfg.loss.with_mtp)
    self.peak = peak_flops_per_device(cfg.peak_flops)

  # ----- state ------------------------------------------------------------------------------------------
  def _init_state(self) -> step_lib.TrainState:
    return init_sharded_state(self.mcfg, self.tx, self.mesh, self.cfg.seed)

  def _restore(self, step: int) -> None:
    abstract = abstract_of(self.state)
    self.state, data_state, meta = self.ckpt.restore(step, abstract_state=abstract)
    self.it.set_state(data_state)
    self.step = int(self.state.step)
    st = meta.get("stability", {})
    if "detector" in st:
      self.detector.load_state_dict(st["detector"])
    if "anticipatory" in st:
      self.ar.load_state_dict(st["anticipatory"])
    self.rollbacks = int(st.get("rollbacks", 0))
    self.injected = set(st.get("injected", []))
    self.pending.clear()
    log.info("resumed from step %d", self.step)

  def _stability_meta(self) -> dict[str, Any]:
    return {"detector": self.detector.state_dict(), "anticipatory": self.ar.state_dict(),
            "rollbacks": self.rollbacks, "injected": sorted(self.injected)}

  def save(self) -> bool:
    data_state = self.pending[0][1] if self.pending else self.it.get_state()
    return self.ckpt.save(self.step, self.state, data_state=data_state,
                          meta={**self.meta, "stability": self._stability_meta()})

  # ----- compiled functions -------------------------------------------------------------------------------
  def _step_fn(self, stage: str, with_routing: bool):
    key = ("step", stage, with_routing)
    if key not in self._compiled:
      c = self.cfg
      scfg = step_lib.StepConfig(grad_accum=c.grad_accum, stage=stage, balance_weight=c.loss.balance_weight,
                                 indexer_weight=c.loss.indexer_weight, bias_update_speed=c.loss.bias_update_speed,
                                 with_mtp=c.loss.with_mtp, remat=c.remat)
      fn = traced_under(self.mesh, step_lib.make_train_step(self.graphdef, self.tx, scfg))
      in_sh = [self.state_sharding, self.batch_sharding, self.replicated]
      if with_routing:
        in_sh.append(NamedSharding(self.mesh, P(None, sharding.BATCH_AXES)))
      self._compiled[key] = jax.jit(fn, in_shardings=tuple(in_sh), out_shardings=(self.state_sharding,
                                                                                   self.replicated),
                                    donate_argnums=0)
    return self._compiled[key]

  def _route_fn(self):
    if "route" not in self._compiled:
      fn = traced_under(self.mesh, step_lib.make_route_fn(self.graphdef, self.cfg.loss.with_mtp))
      self._compiled["route"] = jax.jit(fn, out_shardings=NamedSharding(self.mesh, P(None, sharding.BATCH_AXES)))
    return self._compiled["route"]

  def _eval_fn(self):
    if "eval" not in self._compiled:
      self._compiled["eval"] = jax.jit(traced_under(self.mesh, step_lib.make_eval_step(self.graphdef)))
    return self._compiled["eval"]

  def device_batch(self, batch: dict[str, np.ndarray]):
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v, np.int32))
            for k, v in batch.items() if k in ("tokens", "segment_ids", "positions")}

  # ----- data with anticipatory-routing lookahead ----------------------------------------------------------
  def _pull(self):
    before = self.it.get_state()
    return [self.device_batch(next(self.it)), before, None]

  def next_batch(self):
    """(batch, routing or None). In anticipatory mode, batch t+Δt is routed now with the current parameters
    and its indices are used at step t+Δt; the first Δt steps after switching on use the switch-on params."""
    if not self.ar.on:
      entry = self.pending.popleft() if self.pending else self._pull()
      return entry[0], None
    while len(self.pending) < self.ar.delta + 1:
      self.pending.append(self._pull())
    route = self._route_fn()
    for entry in self.pending:
      if entry[2] is None:
        entry[2] = route(self.state.params, self.state.buffers, entry[0])
    batch, _, routing = self.pending.popleft()
    return batch, routing

  # ----- evaluation -----------------------------------------------------------------------------------------
  def evaluate(self) -> float:
    if not hasattr(self, "_eval_batches"):
      self._eval_batches = [self.device_batch(b) for b in data.eval_batches(self.cfg.data, self.tok,
                                                                            self.cfg.eval_batches)]
    fn = self._eval_fn()
    total = count = 0.0
    for b in self._eval_batches:
      s, n = fn(self.state.params, self.state.buffers, b)
      total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)

  # ----- spikes ----------------------------------------------------------------------------------------------
  def handle_spike(self, writer: MetricsWriter, loss: float, new_state) -> None:
    sc = self.cfg.stability
    writer.event(self.step, "spike", loss=loss, mean=self.detector.mean, std=math.sqrt(self.detector.var))
    self.rollbacks += 1
    if self.rollbacks > sc.max_rollbacks:
      raise RuntimeError(f"more than stability.max_rollbacks={sc.max_rollbacks} loss spikes; stopping "
                         f"(last good checkpoint: {self.ckpt.latest_step()})")
    target = self.snapshots.before(self.step - sc.rollback_distance)
    if target is not None:
      to_step, state, extra = target
      self.state = state
      self.detector.load_state_dict(extra["detector"])
      source = "memory"
    elif self.ckpt.latest_step() is not None and self.ckpt.latest_step() <= self.step - sc.rollback_distance:
      to_step = self.ckpt.latest_step()
      self.state = new_state
      abstract = abstract_of(new_state)
      self.state, _, meta = self.ckpt.restore(to_step, abstract_state=abstract)
      self.detector.load_state_dict(meta["stability"]["detector"])
      source = "checkpoint"
    else:
      writer.event(self.step, "rollback_unavailable", reason="no snapshot or checkpoint old enough")
      self.state = new_state  # the step kept the old parameters if the update was not finite
      self.ar.switch_on()
      writer.event(self.step, "anticipatory_on", delta=self.ar.delta, steps=self.ar.remaining)
      return
    # Checkpoints past the target hold the abandoned trajectory (e.g. the blown-up parameters of the step before
    # the spike); orbax would also skip every later save at a step up to the newest of them.
    dropped = self.ckpt.delete_after(to_step)
    writer.event(self.step, "rollback", to_step=to_step, source=source,
                 skipped_batches=self.step - to_step + 1, deleted_checkpoints=dropped)
    self.snapshots.drop_after(to_step)
    self.step = to_step
    self.pending.clear()  # the data stream moves on: batches around the spike are skipped
    self.ar.switch_on()
    writer.event(self.step, "anticipatory_on", delta=self.ar.delta, steps=self.ar.remaining)

  def _hparams(self):
    c = self.cfg
    mtp_w = c.loss.mtp_weight if self.step < self.decay_start else c.loss.mtp_weight_after_decay
    lr_scale = 1.0
    if self.step == c.debug.lr_blip_step and "lr_blip" not in self.injected:
      self.injected.add("lr_blip")
      lr_scale = c.debug.lr_blip_factor
    if self.step == c.debug.nan_step and "nan" not in self.injected:
      self.injected.add("nan")
      lr_scale = float("nan")
    return {"mtp_weight": jnp.float32(mtp_w), "lr_scale": jnp.float32(lr_scale)}

  # ----- the loop ---------------------------------------------------------------------------------------------
  def run(self) -> dict[str, Any]:
    cfg = self.cfg
    writer = MetricsWriter(self.workdir)
    bar = None
    if cfg.progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    n_dev = self.mesh.size
    last = {}
    t_last, steps_since = time.perf_counter(), 0
    self.snapshots.maybe_take(self.step, self.state, {"detector": self.detector.state_dict()})
    try:
      while self.step < cfg.steps:
        stage = train_config.stage_at(cfg, self.step)
        batch, routing = self.next_batch()
        hp = self._hparams()
        fn = self._step_fn(stage, routing is not None)
        args = (self.state, batch, hp) + ((routing,) if routing is not None else ())
        new_state, metrics = fn(*args)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        loss = metrics["loss"]
        if cfg.stability.enabled and (not metrics["finite"] or self.detector.is_spike(loss)):
          self.handle_spike(writer, loss, new_state)
          if bar is not None:
            bar.n = self.step
            bar.refresh()
          continue
        if not metrics["finite"]:
          writer.event(self.step, "skipped_non_finite", loss=loss)
          self.state = new_state
          continue
        self.state = new_state
        self.detector.accept(loss)
        self.step += 1
        steps_since += 1
        if self.ar.on and self.ar.tick():
          writer.event(self.step, "anticipatory_off")
        self.snapshots.maybe_take(self.step, self.state, {"detector": self.detector.state_dict()})

        row = {"step": self.step, "loss": loss, **{k: v for k, v in metrics.items() if k not in ("loss",)},
               "lr": float(self.schedule(self.step - 1)), "stage": stage, "anticipatory": self.ar.on}
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
          jax.block_until_ready(self.state.step)
          dt = time.perf_counter() - t_last
          tps = steps_since * tokens_per_step / max(dt, 1e-9)
          row["tokens_per_s"] = tps
          if self.peak:
            row["mfu"] = tps * self.flops_per_token / (self.peak * n_dev)
          t_last, steps_since = time.perf_counter(), 0
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
          row["eval_loss"] = self.evaluate()
        writer.write(row)
        last = row
        if bar is not None:
          bar.update(1)
          if "tokens_per_s" in row:
            post = {"loss": f"{loss:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if "mfu" in row:
              post["mfu"] = f"{row['mfu']:.1%}"
            if "eval_loss" in row:
              post["eval"] = f"{row['eval_loss']:.3f}"
            bar.set_postfix(post)
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
          self.save()
      if self.ckpt.latest_step() != self.step:
        self.save()
      self.ckpt.wait()
      if cfg.export_hf:
        self.export(os.path.join(self.workdir, "hf"))
    finally:
      if bar is not None:
        bar.close()
      writer.close()
      self.ckpt.wait()
    return last

  def model(self) -> DeepSeekV4:
    return nnx.merge(self.graphdef, self.state.params, self.state.buffers)

  def export(self, out_dir: str) -> None:
    """The trained model in the official checkpoint format, with its tokenizer, for `dsv4 generate`."""
    from dsv4_jax.weights import save_pretrained
    save_pretrained(self.model(), self.mcfg, out_dir, overwrite=True, progress=False)
    self.tok.save(os.path.join(out_dir, "tokenizer.json"))


def train(cfg, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run `cfg` in `workdir`; returns the last step's metrics row."""
  trainer = Trainer(cfg, workdir)
  try:
    return trainer.run()
  finally:
    trainer.ckpt.close()
