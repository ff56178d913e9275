"""The training run's config (ml_collections): every field a `dsv4 train --config.FIELD=VALUE` can set."""

from __future__ import annotations

import ml_collections

from dsv4_jax.train import data

# Train fields that must match a checkpoint to resume from it (the model config must match entirely).
CRITICAL_TRAIN_KEYS = ("seed", "data.seq_len", "data.global_batch", "data.seed", "data.source", "data.vocab_size",
                       "data.text_field", "data.eval_fraction")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model: a preset name, checkpoint dir, config.json or ml_collections .py; vocab_size comes from data.
  c.model = "tiny"
  c.model_overrides = ml_collections.ConfigDict()  # any ModelConfig field, e.g. {"hidden_size": 128}
  c.data = data.default_config()
  c.seed = 0
  c.steps = 200
  c.grad_accum = 1  # microbatches per step (global_batch must divide)
  c.remat = "none"  # "none" | "full" | "save_attention" | "save_dots"

  c.optimizer = ml_collections.ConfigDict(dict(
      peak_lr=3e-3, warmup_steps=20, decay_start=0.8,  # decay_start: fraction of `steps` where cosine begins
      end_lr_ratio=0.1, weight_decay=0.1, muon_momentum=0.95, muon_rms=0.18, adam_b1=0.9, adam_b2=0.95,
      adam_eps=1e-20, ns_dtype="bfloat16"))
  c.loss = ml_collections.ConfigDict(dict(
      mtp_weight=0.3, mtp_weight_after_decay=0.1, balance_weight=1e-4, indexer_weight=1.0,
      bias_update_speed=1e-3, with_mtp=True))
  # Indexer curriculum (spec §12): dense attention for `dense_steps`, then the indexer warm-up (only the
  # indexers train, by KL to the dense attention) for `indexer_warmup_steps`, then sparse top-k.
  c.curriculum = ml_collections.ConfigDict(dict(dense_steps=0, indexer_warmup_steps=0))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))

  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.export_hf = True  # write WORKDIR/hf (save_pretrained + tokenizer.json) at the end
  c.peak_flops = 0.0  # per device, for MFU; 0 = from the device kind (unknown kinds: MFU not shown)
  c.progress = True

  # Loss spikes (spec §12 Stability): detection, rollback, anticipatory routing for a while.
  c.stability = ml_collections.ConfigDict(dict(
      enabled=True, k_sigma=6.0, min_rel=0.2, ema_decay=0.95, min_history=20,
      snapshot_every=10, keep_snapshots=2, rollback_distance=1,  # roll back to a snapshot <= spike step - distance
      anticipatory_delta=2, anticipatory_steps=20, max_rollbacks=10))
  # Fault injection for tests and demos: scale one step's update (LR blip) / make one update non-finite.
  c.debug = ml_collections.ConfigDict(dict(lr_blip_step=-1, lr_blip_factor=1000.0, nan_step=-1))
  return c


def stage_at(cfg, step: int) -> str:
  """The indexer-curriculum stage of `step`."""
  dense, warm = cfg.curriculum.dense_steps, cfg.curriculum.indexer_warmup_steps
  if step < dense:
    return "dense"
  if step < dense + warm:
    return "warmup"
  return "sparse"


def flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
  """Dotted-key dict of JSON-friendly values (for checkpoint meta and logs)."""
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(flat(v, key + "."))
    elif isinstance(v, (list, tuple)):
      out[key] = list(v)
    elif v is None or isinstance(v, (bool, int, float, str)):
      out[key] = v
    else:
      out[key] = str(v)
  return out
